"""Maps the repository's top-level folders into the `baton` import namespace.

operator/ -> baton.operator, workers/ -> baton.workers, kernels/ -> baton.kernels,
proto/ -> baton.proto. Sub-packages are discovered, so adding a folder with an
__init__.py needs no change here. There is never a top-level `operator` package.
"""

from setuptools import find_packages, setup

ROOTS = {
    "operator": "baton.operator",
    "workers": "baton.workers",
    "kernels": "baton.kernels",
    "proto": "baton.proto",
}

packages: list[str] = []
package_dir: dict[str, str] = {}
for folder, name in ROOTS.items():
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"baton.proto": ["**/*.proto", "**/*.pyi"], "baton.operator": ["**/*.yaml"]},
)
