"""Maps the top-level folders onto one import namespace, ``tinyfleet``.

Everything else about the distribution lives in ``pyproject.toml``.
"""

from setuptools import find_packages, setup

FOLDERS = {
    "tinyfleet.agent": "agent",
    "tinyfleet.host": "host",
    "tinyfleet.sim": "firmware-sim",
    "tinyfleet.recipes": "models",
}

packages = []
for name, folder in FOLDERS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(
    packages=packages,
    package_dir=FOLDERS,
    package_data={
        "": ["*.toml", "*.json", "*.ini", "*.mako", "*.html", "*.css", "*.js", "py.typed"]
    },
)
