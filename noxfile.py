"""Developer tasks: `nox -s tests`, `slow`, `lint`, `docs`, `main`, `package`."""

import glob
import shutil

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Unit suite: tiny models, synthetic data, no download; several CPU-minutes (more wall time if busy)."""
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "not slow", *session.posargs)


@nox.session(python=PYTHON)
def slow(session: nox.Session) -> None:
    """Long suites: the whole torchvision zoo, real-data runs (read $LIGHTNING_PRUNE_DATA)."""
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Ruff lint and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/ (mkdocs, strict: every warning is an error)."""
    session.install("mkdocs-material>=9.5", "mkdocstrings[python]>=0.26")
    env = {"NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material prints an end-of-life banner otherwise
    session.run("mkdocs", "build", "--strict", "--site-dir", "site", *session.posargs, env=env)
    session.run("python", "docs/check_site.py", "site")  # no raw :func: roles, no Lightning hooks in the API


@nox.session(python=PYTHON)
def main(session: nox.Session) -> None:
    """The README's first command: install, then prune-train-shrink on scikit-learn's digits (no download)."""
    session.install("-e", ".[examples]")
    # One thread: for a network this small, a second thread only adds synchronisation (about 5x slower).
    env = {"OMP_NUM_THREADS": "1"}
    session.run("lightning-prune", "fit", "--config", "examples/digits_snip.yaml", *session.posargs, env=env)


@nox.session(python=PYTHON)
def package(session: nox.Session) -> None:
    """Build the wheel and sdist into dist/, check them with twine, install the wheel and run its CLI."""
    session.install("build[uv]>=1.2", "twine>=5")
    shutil.rmtree("dist", ignore_errors=True)
    session.run("python", "-m", "build", "--installer", "uv", "--outdir", "dist")
    session.run("twine", "check", "--strict", *glob.glob("dist/*"))
    # a plain install (no extras) must give a working `lightning-prune` (its parser needs jsonargparse)
    wheel = glob.glob("dist/*.whl")
    session.install("--reinstall-package", "lightning-prune", *wheel)
    session.run("lightning-prune", "--help", silent=True)
