"""baton.proto: gRPC protocol sources (proto/baton/<area>/v1/) and their generated stubs."""
