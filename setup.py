"""Install bilevel. torch is pinned by constraints.txt on the project's machines (see README)."""

from setuptools import find_packages, setup

setup(
    name="bilevel",
    version="0.1.0",
    description="Gradient-based bilevel optimization in PyTorch: exact, fast, safe by default.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["bilevel", "bilevel.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.10", "higher>=0.2.1", "numpy", "tqdm", "pillow"],
    extras_require={
        "dev": [
            "pytest",
            "pytest-xdist",  # make test runs the tests in two processes
            "ruff",
            "mkdocs",
            "mkdocs-material",
            "mkdocstrings[python]",
            "django-static-mathjax",  # MathJax's files, shipped with the docs (no CDN)
            "matplotlib",
        ],
        "examples": ["matplotlib"],
    },
)
