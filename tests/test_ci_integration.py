"""CI integration: the pre-commit hooks run for real, action.yml and docs/ci.md stay consistent.

The pre-commit tests build pre-commit's own virtualenv and pip-install this checkout into it
(typer, rich, numpy from the package index), so they are marked slow and skip, naming the
reason, when pre-commit is not installed or the environment cannot be built for lack of
network. Any other failure fails the test.

The checkout under test is snapshotted into a temporary git repository (tracked and untracked
files, minus what .gitignore excludes): ``pre-commit try-repo`` on a dirty checkout only picks
up *modified tracked* files, so new files such as ``.pre-commit-hooks.yaml`` itself would be
invisible before they are committed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOOKS_FILE = ROOT / ".pre-commit-hooks.yaml"
ACTION_FILE = ROOT / "action.yml"
CI_DOC = ROOT / "docs" / "ci.md"

# Output of a failed environment build that means "no network / no index", not a bug.
NETWORK_ERRORS = re.compile(
    r"Temporary failure in name resolution|Name or service not known|Network is unreachable"
    r"|NewConnectionError|Max retries exceeded|ConnectTimeout|ReadTimeout|ProxyError"
    r"|Could not find a version that satisfies|No matching distribution found"
    r"|connection (refused|reset)|Failed to establish a new connection|nodename nor servname",
    re.IGNORECASE,
)


def _load_yaml(path: Path) -> Any:
    import yaml  # PyYAML: a declared dev dependency, so a missing install fails instead of skipping

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _hook_ids() -> list[str]:
    return [hook["id"] for hook in _load_yaml(HOOKS_FILE)]


# --------------------------------------------------------------------------- static checks


def test_hooks_manifest_is_valid() -> None:
    hooks = _load_yaml(HOOKS_FILE)
    assert isinstance(hooks, list)
    by_id = {hook["id"]: hook for hook in hooks}
    assert {"ckptdoctor-scan", "ckptdoctor-check"} <= set(by_id)
    for hook in hooks:
        assert {"id", "name", "entry", "language"} <= set(hook), hook
        assert hook["language"] == "python"
        assert hook.get("pass_filenames", True) is True
    scan = by_id["ckptdoctor-scan"]
    assert scan["entry"] == "ckptdoctor scan"
    files = re.compile(scan["files"])
    for name in ("a.pt", "w/b.pth", "pytorch_model.bin", "x.ckpt", "model.safetensors"):
        assert files.search(name), name
    for name in ("a.py", "model.safetensors.index.json", "notes.txt", "pt"):
        assert not files.search(name), name
    # pre-commit's own validator, when available, agrees
    try:
        from pre_commit.clientlib import load_manifest
    except ImportError:
        return
    load_manifest(str(HOOKS_FILE))


def test_action_yml_inputs() -> None:
    action = _load_yaml(ACTION_FILE)
    inputs = action["inputs"]
    assert set(inputs) == {"command", "python-version", "torch", "version"}
    assert inputs["command"]["required"] is True
    assert str(inputs["python-version"]["default"]) == "3.11"
    assert inputs["torch"]["default"] == ""
    assert inputs["version"]["default"] == ""
    runs = action["runs"]
    assert runs["using"] == "composite"
    uses = [step["uses"] for step in runs["steps"] if "uses" in step]
    assert "actions/setup-python@v5" in uses
    for step in runs["steps"]:
        if "run" in step:
            assert step["shell"] == "bash"
            # inputs reach scripts only through env (no expression injection into the script text)
            assert "${{" not in step["run"], step["run"]


def _action_script(name: str) -> str:
    action = _load_yaml(ACTION_FILE)
    return next(step["run"] for step in action["runs"]["steps"] if step.get("name") == name)


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("", "<ACTION_PATH>"),
        ("0.1.0", "ckptdoctor==0.1.0"),
        (">=0.1,<0.2", "ckptdoctor>=0.1,<0.2"),
        ("ckptdoctor[torch]==0.1.0", "ckptdoctor[torch]==0.1.0"),
        ("git+https://github.com/o/ckptdoctor@v0.1.0", "git+https://github.com/o/ckptdoctor@v0.1.0"),
    ],
)
def test_action_install_step_resolves_version(tmp_path: Path, version: str, expected: str) -> None:
    """Run the install step's bash with a stub `python` that records pip's arguments."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    log = tmp_path / "calls"
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    for tool in ("python", "ckptdoctor"):
        stub = stub_dir / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n')
        stub.chmod(0o755)
    env = {
        "PATH": f"{stub_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "CKPTDOCTOR_TORCH": "torch==2.5.1 --index-url https://download.pytorch.org/whl/cpu",
        "CKPTDOCTOR_VERSION": version,
        "CKPTDOCTOR_ACTION_PATH": "<ACTION_PATH>",
    }
    proc = subprocess.run([bash, "-eo", "pipefail", "-c", _action_script("Install ckptdoctor")], env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls == [
        "python -m pip install --disable-pip-version-check torch==2.5.1 --index-url "
        "https://download.pytorch.org/whl/cpu",
        f"python -m pip install --disable-pip-version-check {expected}",
        "ckptdoctor --version",
    ]


def _make_checkpoints(where: Path, marker: Path) -> tuple[Path, Path]:
    torch = pytest.importorskip("torch")

    class Payload:  # torch.save pickles the call, nothing runs here
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    benign, evil = where / "benign.pt", where / "evil.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), benign)
    torch.save({"weight": torch.zeros(2), "extra": Payload()}, evil)
    return benign, evil


def test_action_run_step_propagates_exit_code(tmp_path: Path) -> None:
    """The run step with this venv's ckptdoctor: 0 for a benign file, 1 for os.system, quoting kept."""
    bash = shutil.which("bash")
    exe = Path(sys.executable).parent / "ckptdoctor"
    # The console script is part of the package: its absence is a broken install, never a reason to skip.
    assert bash is not None, "bash is not installed"
    assert exe.exists(), f"the ckptdoctor console script is missing beside {sys.executable}"
    marker = tmp_path / "MARKER"
    (tmp_path / "dir with space").mkdir()
    _make_checkpoints(tmp_path / "dir with space", marker)
    script = _action_script("Run ckptdoctor")
    env = dict(os.environ, PATH=f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}", NO_COLOR="1")

    def run(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([bash, "-eo", "pipefail", "-c", script], env=dict(env, CKPTDOCTOR_COMMAND=command),
                              cwd=tmp_path, capture_output=True, text=True, check=False)

    ok = run("scan 'dir with space/benign.pt'")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = run('scan "dir with space"/*.pt')  # a glob, expanded by the step's shell
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "posix.system" in bad.stdout or "os.system" in bad.stdout
    assert "benign.pt" in bad.stdout
    usage = run("scan 'dir with space/missing.pt'")
    assert usage.returncode == 2
    assert not marker.exists()


def test_ci_doc_mentions_every_hook() -> None:
    text = CI_DOC.read_text(encoding="utf-8")
    for hook_id in _hook_ids():
        assert hook_id in text, f"docs/ci.md does not mention hook {hook_id}"
    assert "exit code" in text.lower()


# --------------------------------------------------------------------------- pre-commit, for real


def _pre_commit() -> str | None:
    beside = Path(sys.executable).parent / "pre-commit"
    if beside.exists():
        return str(beside)
    return shutil.which("pre-commit")


def _git(*args: str, cwd: Path, stdin: str | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, input=stdin, capture_output=True, text=True, check=True)
    return proc.stdout


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    # GIT_DIR & co. are set when the suite itself runs inside a git hook; they would redirect our git calls.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_") and k != "PRE_COMMIT"}
    env.update(
        GIT_AUTHOR_NAME="ckptdoctor tests", GIT_AUTHOR_EMAIL="tests@example.invalid",
        GIT_COMMITTER_NAME="ckptdoctor tests", GIT_COMMITTER_EMAIL="tests@example.invalid",
        GIT_CONFIG_NOSYSTEM="1", NO_COLOR="1", PRE_COMMIT_COLOR="never",
    )
    env.update(extra)
    return env


def _snapshot_checkout(dest: Path, env: dict[str, str]) -> str:
    """Copy the checkout under test (tracked + untracked, minus ignored) into a fresh git repo; return HEAD."""
    dest.mkdir()
    try:
        listed = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).split("\0")
        listed = [p for p in listed if p]
        # tracked files that .gitignore excludes (e.g. a committed .venv) stay out too
        ignored = subprocess.run(["git", "check-ignore", "--no-index", "-z", "--stdin"], cwd=ROOT,
                                 input="\0".join(listed), capture_output=True, text=True, check=False).stdout
        files = sorted(set(listed) - set(ignored.split("\0")))
    except (subprocess.CalledProcessError, FileNotFoundError):
        skip = {".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis",
                "build", "dist", "demo-out"}
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not (set(p.relative_to(ROOT).parts) & skip)
                 and "__pycache__" not in p.parts and not any(part.endswith(".egg-info") for part in p.parts)]
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, env=env, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, env=env, check=True)
    subprocess.run(["git", "commit", "-q", "--no-gpg-sign", "-m", "snapshot"], cwd=dest, env=env, check=True)
    return _git("rev-parse", "HEAD", cwd=dest).strip()


class HookRunner:
    """Runs the hooks in a sample repository whose .pre-commit-config.yaml points at the snapshot.

    ``run`` uses ``pre-commit run`` (the hook environment is built once in PRE_COMMIT_HOME and
    reused); ``try_repo`` uses ``pre-commit try-repo``, which always builds a throwaway store.
    """

    def __init__(self, exe: str, snapshot: Path, ref: str, repo: Path, env: dict[str, str], home: Path,
                 marker: Path) -> None:
        self.exe, self.snapshot, self.ref, self.repo, self.env, self.home = exe, snapshot, ref, repo, env, home
        self.marker = marker
        self.timings: list[tuple[str, float]] = []

    def run(self, hook_id: str, *files: str) -> subprocess.CompletedProcess[str]:
        return self._call(["run", hook_id, "--verbose", "--files", *files], hook_id, files)

    def try_repo(self, hook_id: str, *files: str) -> subprocess.CompletedProcess[str]:
        return self._call(["try-repo", str(self.snapshot), hook_id, "--ref", self.ref, "--verbose", "--files", *files],
                          f"try-repo {hook_id}", files)

    def _call(self, args: list[str], label: str, files: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        proc = subprocess.run([self.exe, *args], cwd=self.repo, env=self.env, capture_output=True, text=True,
                              timeout=900, check=False)
        self.timings.append((f"{label} {' '.join(files)}", time.monotonic() - started))
        self._skip_if_no_network(proc)
        return proc

    def _skip_if_no_network(self, proc: subprocess.CompletedProcess[str]) -> None:
        output = proc.stdout + proc.stderr
        if proc.returncode == 0 or "An unexpected error has occurred" not in output:
            return  # a hook ran (and passed or failed): not an environment problem
        log = self.home / "pre-commit.log"
        details = output + (log.read_text(errors="replace") if log.exists() else "")
        found = NETWORK_ERRORS.search(details)
        if found:
            pytest.skip(f"pre-commit could not build the hook environment (no network / package index): {found[0]}")


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory) -> Any:
    exe = _pre_commit()
    if exe is None:
        pytest.skip("pre-commit is not installed (pip install pre-commit, or the [dev] extra)")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    base = tmp_path_factory.mktemp("ci")
    home = base / "pre-commit-home"
    env = _clean_env({"PRE_COMMIT_HOME": str(home)})
    snapshot = base / "ckptdoctor-snapshot"
    ref = _snapshot_checkout(snapshot, env)

    repo = base / "sample"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, env=env, check=True)
    marker = base / "MARKER"
    _make_checkpoints(repo, marker)
    subprocess.run([sys.executable, "-m", "ckptdoctor", "spec", "benign.pt", "--digests", "-o", "benign.spec.json"],
                   cwd=repo, env=env, check=True, capture_output=True)
    (repo / ".pre-commit-config.yaml").write_text(
        f"repos:\n- repo: {snapshot}\n  rev: {ref}\n  hooks:\n"
        "  - id: ckptdoctor-scan\n"
        "  - id: ckptdoctor-check\n    args: [--against, benign.spec.json]\n", encoding="utf-8")
    subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True)
    subprocess.run(["git", "commit", "-q", "--no-gpg-sign", "-m", "weights"], cwd=repo, env=env, check=True)
    runner = HookRunner(exe, snapshot, ref, repo, env, home, marker)
    yield runner
    sys.stderr.write("\npre-commit timings: "
                     + ", ".join(f"{what}: {secs:.1f}s" for what, secs in runner.timings) + "\n")


def _assert_blocks_payload(proc: subprocess.CompletedProcess[str], marker: Path) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert re.search(r"ckptdoctor scan.*Failed", output), output
    assert "exit code: 1" in output
    assert "posix.system" in output or "os.system" in output, output
    assert "dangerous" in output
    assert not marker.exists()


@pytest.mark.slow
def test_precommit_scan_hook_passes_benign_checkpoint(hooks: HookRunner) -> None:
    proc = hooks.run("ckptdoctor-scan", "benign.pt")  # the first call builds the hook environment
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert re.search(r"ckptdoctor scan.*Passed", output), output
    assert "safe" in output


@pytest.mark.slow
def test_precommit_scan_hook_fails_malicious_checkpoint(hooks: HookRunner) -> None:
    _assert_blocks_payload(hooks.run("ckptdoctor-scan", "evil.pt", "benign.pt"), hooks.marker)


@pytest.mark.slow
def test_precommit_try_repo_scan_hook(hooks: HookRunner) -> None:
    """What a user trying the hook out runs: the manifest as published, its own environment."""
    _assert_blocks_payload(hooks.try_repo("ckptdoctor-scan", "evil.pt"), hooks.marker)


def _declares_check_all() -> bool:
    return "ckptdoctor-check-all" in (ROOT / "pyproject.toml").read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.skipif(not _declares_check_all(),
                    reason="the ckptdoctor-check hook needs the ckptdoctor-check-all console script (not yet added)")
def test_precommit_check_hook(hooks: HookRunner) -> None:
    torch = pytest.importorskip("torch")
    ok = hooks.run("ckptdoctor-check", "benign.pt")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "loads as is" in ok.stdout
    state = torch.load(hooks.repo / "benign.pt", weights_only=True)
    state["weight"][0, 0] += 1
    torch.save(state, hooks.repo / "changed.pt")
    bad = hooks.run("ckptdoctor-check", "benign.pt", "changed.pt")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "digest" in bad.stdout
    assert "changed.pt" in bad.stdout
    assert not hooks.marker.exists()
