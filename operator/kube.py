"""A small synchronous Kubernetes API client for plain-dict objects.

The operator's objects are dicts from the builders, so a typed client buys nothing; this wraps
the official client's authenticated transport (kubeconfig, in-cluster tokens that rotate) and
speaks the REST paths directly. Kopf runs sync handlers in worker threads, which is where this
is called from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

FIELD_MANAGER = "baton-operator"


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, method: str, path: str, body: str):
        self.status = status
        try:
            self.message = json.loads(body).get("message", body)
        except (ValueError, AttributeError):
            self.message = body
        super().__init__(f"{method} {path}: HTTP {status}: {self.message}")


@dataclass(frozen=True)
class Resource:
    """An API resource: apiVersion ("apps/v1", "v1") and plural ("deployments")."""

    api_version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        base = (f"/api/{self.api_version}" if "/" not in self.api_version
                else f"/apis/{self.api_version}")
        if self.namespaced and namespace is not None:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{quote(name, safe='')}"
        if subresource is not None:
            base += f"/{subresource}"
        return base


def resource_of(kind: str, api_version: str) -> Resource:
    """The Resource of an object kind the operator manages."""
    plural = KNOWN_PLURALS.get(kind)
    if plural is None:
        raise ValueError(f"kind {kind!r} is not one the operator manages; known: "
                         f"{', '.join(sorted(KNOWN_PLURALS))}")
    return Resource(api_version, plural)


KNOWN_PLURALS = {
    "Deployment": "deployments", "Service": "services", "ConfigMap": "configmaps",
    "PodDisruptionBudget": "poddisruptionbudgets", "NetworkPolicy": "networkpolicies",
    "PodMonitor": "podmonitors", "Model": "models", "Pod": "pods", "Event": "events",
    "Secret": "secrets",
}


class Kube:
    """Get, list, create, apply (server-side), merge-patch and delete dict objects."""

    def __init__(self, configuration: Any, timeout_seconds: float = 30.0):
        import urllib3

        self._config = configuration
        self._timeout = urllib3.Timeout(total=timeout_seconds)
        tls: dict[str, Any] = {}
        if configuration.host.startswith("https"):
            tls["cert_reqs"] = "CERT_REQUIRED" if configuration.verify_ssl else "CERT_NONE"
            if configuration.ssl_ca_cert:
                tls["ca_certs"] = configuration.ssl_ca_cert
            if configuration.cert_file:
                tls["cert_file"] = configuration.cert_file
            if configuration.key_file:
                tls["key_file"] = configuration.key_file
        self._http = urllib3.PoolManager(maxsize=8, **tls)

    @classmethod
    def from_config(cls, kubeconfig: str | None = None) -> Kube:
        """In-cluster credentials when running in a pod, else the kubeconfig
        (`kubeconfig`, $KUBECONFIG or ~/.kube/config)."""
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            if kubeconfig:
                raise config.ConfigException("a kubeconfig was given")
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        return cls(configuration)

    def _auth_headers(self) -> dict[str, str]:
        # The client's configuration refreshes rotating tokens (in-cluster, exec plugins)
        # when asked for the key, so ask on every request.
        token = self._config.get_api_key_with_prefix("authorization") or \
            self._config.get_api_key_with_prefix("BearerToken")
        return {"Authorization": token} if token else {}

    def request(self, method: str, path: str, body: Any = None, *,
                query: dict[str, str] | None = None,
                content_type: str = "application/json") -> Any:
        url = self._config.host.rstrip("/") + path + (f"?{urlencode(query)}" if query else "")
        headers = {"Accept": "application/json", "Content-Type": content_type,
                   "User-Agent": FIELD_MANAGER, **self._auth_headers()}
        payload = None if body is None else json.dumps(body).encode()
        response = self._http.request(method, url, body=payload, headers=headers,
                                      timeout=self._timeout, retries=False)
        text = response.data.decode(errors="replace")
        if not 200 <= response.status <= 299:
            raise ApiError(response.status, method, path, text)
        return json.loads(text) if text else None

    def get(self, res: Resource, namespace: str | None, name: str) -> dict | None:
        try:
            return self.request("GET", res.path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, res: Resource, namespace: str | None,
             labels: dict[str, str] | None = None) -> list[dict]:
        """Objects with all `labels` (also filtered here: some API servers ignore selectors)."""
        query = {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels \
            else None
        items = self.request("GET", res.path(namespace), query=query).get("items") or []
        if labels:
            items = [o for o in items
                     if all(((o.get("metadata") or {}).get("labels") or {}).get(k) == v
                            for k, v in labels.items())]
        return items

    def create(self, res: Resource, namespace: str | None, body: dict) -> dict:
        return self.request("POST", res.path(namespace), body,
                            query={"fieldManager": FIELD_MANAGER})

    def apply(self, res: Resource, namespace: str | None, body: dict) -> dict:
        """Server-side apply: fields the operator stops setting are removed, fields others
        own (the autoscaler's status, kubectl annotations) are kept."""
        name = body["metadata"]["name"]
        return self.request("PATCH", res.path(namespace, name), body,
                            query={"fieldManager": FIELD_MANAGER, "force": "true"},
                            content_type="application/apply-patch+yaml")

    def merge_patch(self, res: Resource, namespace: str | None, name: str, body: dict,
                    subresource: str | None = None) -> dict:
        return self.request("PATCH", res.path(namespace, name, subresource), body,
                            content_type="application/merge-patch+json")

    def delete(self, res: Resource, namespace: str | None, name: str) -> bool:
        """Deletes with background propagation; False when it was already gone."""
        try:
            self.request("DELETE", res.path(namespace, name),
                         {"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def has_api(self, group_version: str, plural: str) -> bool:
        """Whether the server serves `plural` in group/version (e.g. monitoring.coreos.com/v1
        podmonitors)."""
        try:
            found = self.request("GET", f"/apis/{group_version}")
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.get("name") == plural for r in (found or {}).get("resources") or [])
