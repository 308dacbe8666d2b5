"""Safety rules over the whole package source, checked on its syntax trees, plus the job-folder
path guards and a tampered job folder.

Rules (issue "reliability and safety", part 3): no ``shell=True`` and no command strings for
subprocesses; every ``torch.load`` with ``weights_only=True``; Python's full unpickler only in
the body-model reader's explicit, opt-in fallback; nothing that listens on a network port.
Each checker is also run on a small bad example, so a checker that stopped seeing anything would
fail here instead of passing quietly.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from zeroavatar_blender import protocol

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "zeroavatar_blender"

# Where Python's full unpickler may run: the body-model reader's fallback for a file the user
# explicitly trusts (--allow-pickle); see engine/body/convert.py.
PICKLE_ALLOWED = {("engine/body/convert.py", "_trusted_load")}
SUBPROCESS_RUNNERS = {"run", "Popen", "call", "check_call", "check_output"}
SHELL_ONLY = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
              ("asyncio", "create_subprocess_shell")}
SERVER_MODULES = {"socket", "socketserver", "http.server", "xmlrpc.server", "wsgiref", "wsgiref.simple_server",
                  "multiprocessing.connection", "flask", "fastapi", "uvicorn", "aiohttp", "tornado", "gradio",
                  "zmq", "websockets", "bottle", "werkzeug"}
SERVER_CALLS = {"start_server", "start_unix_server", "create_server", "serve_forever", "Listener", "HTTPServer",
                "ThreadingHTTPServer", "TCPServer", "UDPServer"}


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    rule: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.rule}"


def package_sources() -> dict[str, ast.Module]:
    trees = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        trees[rel] = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    return trees


@pytest.fixture(scope="module")
def sources() -> dict[str, ast.Module]:
    trees = package_sources()
    assert len(trees) > 40 and "engine/cli.py" in trees  # really the package, not an empty folder
    return trees


# -- helpers --------------------------------------------------------------------------------
def dotted(node: ast.AST) -> str:
    """'a.b.c' for Name/Attribute chains, '' otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def with_parents(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child._parent = node  # type: ignore[attr-defined]
    return tree


def enclosing_function(node: ast.AST) -> ast.AST | None:
    node = getattr(node, "_parent", None)
    while node is not None and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        node = getattr(node, "_parent", None)
    return node


def calls(tree: ast.AST):
    for node in ast.walk(with_parents(tree)):
        if isinstance(node, ast.Call):
            yield node


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def builds_a_string(node: ast.expr) -> bool:
    """A command string rather than an argument list: a literal, f-string, % or + of strings,
    str.format or str.join."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (str, bytes))
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.Add)):
        return builds_a_string(node.left) or builds_a_string(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("format", "join"):
        return isinstance(node.func.value, (ast.Constant, ast.JoinedStr)) or node.func.attr == "format"
    return False


def assigned_values(scope: ast.AST, name: str) -> list[ast.expr]:
    values = []
    for node in ast.walk(scope):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            values.append(node.value)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name) \
                and node.target.id == name and node.value is not None:
            values.append(node.value)
    return values


# -- the rules ------------------------------------------------------------------------------
def aliased_imports(tree: ast.AST, module: str, names: set[str]) -> list[ast.AST]:
    """Imports that would hide a call from the checks: ``import module as x`` or
    ``from module import name``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == module and a.asname for a in node.names):
            out.append(node)
        elif isinstance(node, ast.ImportFrom) and node.module == module and any(a.name in names for a in node.names):
            out.append(node)
    return out


def check_shell(trees: dict[str, ast.Module]) -> list[Finding]:
    out = []
    for rel, tree in trees.items():
        for call in calls(tree):
            if is_true(keyword(call, "shell")) or (keyword(call, "shell") is not None
                                                    and not isinstance(keyword(call, "shell"), ast.Constant)):
                out.append(Finding(rel, call.lineno, "shell= must be absent or False"))
            name = dotted(call.func)
            if tuple(name.rsplit(".", 1)) in SHELL_ONLY:
                out.append(Finding(rel, call.lineno, f"{name} always runs a shell"))
    return out


def check_subprocess_argv(trees: dict[str, ast.Module]) -> list[Finding]:
    """subprocess.run/Popen/... get an argument list, never a command string (also not through a
    variable that is assigned one in the same function)."""
    out = []
    for rel, tree in trees.items():
        for node in aliased_imports(tree, "subprocess", SUBPROCESS_RUNNERS):
            out.append(Finding(rel, node.lineno, "subprocess imported under another name (call subprocess.run etc.)"))
        for call in calls(tree):
            name = dotted(call.func)
            if not (name.startswith("subprocess.") and name.split(".")[-1] in SUBPROCESS_RUNNERS):
                continue
            argv = call.args[0] if call.args else keyword(call, "args")
            if argv is None:
                out.append(Finding(rel, call.lineno, f"{name} without a command"))
                continue
            suspects = [argv]
            if isinstance(argv, ast.Name):
                scope = enclosing_function(call) or tree
                suspects = assigned_values(scope, argv.id)
            if any(builds_a_string(v) for v in suspects):
                out.append(Finding(rel, call.lineno, f"{name} is given a command string, not an argument list"))
    return out


def check_torch_load(trees: dict[str, ast.Module]) -> list[Finding]:
    out = []
    for rel, tree in trees.items():
        for node in aliased_imports(tree, "torch", set()):
            out.append(Finding(rel, node.lineno, "torch imported under another name"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization") \
                    and any(a.name == "load" for a in node.names):
                out.append(Finding(rel, node.lineno, "import torch's load by name (use torch.load(..., weights_only=True))"))
        for call in calls(tree):
            if dotted(call.func) in ("torch.load", "torch.serialization.load") \
                    and not is_true(keyword(call, "weights_only")):
                out.append(Finding(rel, call.lineno, "torch.load without weights_only=True"))
    return out


def check_pickle(trees: dict[str, ast.Module]) -> list[Finding]:
    """pickle.load(s), pickle.Unpickler(...) and np.load(allow_pickle=True) only where allowed;
    an Unpickler subclass only if it overrides find_class (the restricted one)."""
    out = []
    for rel, tree in trees.items():
        for node in aliased_imports(tree, "pickle", set()):
            out.append(Finding(rel, node.lineno, "pickle imported under another name"))
        for call in calls(tree):
            name = dotted(call.func)
            risky = name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads",
                             "dill.load", "dill.loads", "joblib.load", "pandas.read_pickle", "pd.read_pickle") \
                or (name in ("np.load", "numpy.load") and is_true(keyword(call, "allow_pickle")))
            if not risky:
                continue
            func = enclosing_function(call)
            where = (rel, func.name if func is not None else "<module>")
            if where not in PICKLE_ALLOWED:
                out.append(Finding(rel, call.lineno, f"{name} outside the explicit trusted-file fallback"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(dotted(b) in ("pickle.Unpickler", "Unpickler") for b in node.bases):
                methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
                if "find_class" not in methods:
                    out.append(Finding(rel, node.lineno, f"{node.name} subclasses Unpickler without find_class"))
            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill") \
                    and any(a.name in ("load", "loads", "Unpickler") for a in node.names):
                out.append(Finding(rel, node.lineno, f"import of {node.module}'s loader by name"))
    return out


def check_no_server(trees: dict[str, ast.Module]) -> list[Finding]:
    out = []
    for rel, tree in trees.items():
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for mod in mods:
                if mod in SERVER_MODULES or mod.split(".")[0] in SERVER_MODULES - {"multiprocessing"}:
                    out.append(Finding(rel, node.lineno, f"imports {mod} (network server code)"))
        for call in calls(tree):
            name = dotted(call.func)
            if name.split(".")[-1] in SERVER_CALLS or name.endswith((".bind", ".listen")) and "sock" in name:
                out.append(Finding(rel, call.lineno, f"{name}: opens a listening socket"))
    return out


RULES = {"shell": check_shell, "subprocess_argv": check_subprocess_argv, "torch_load": check_torch_load,
         "pickle": check_pickle, "no_server": check_no_server}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_package_source_follows_the_rule(sources, rule):
    findings = RULES[rule](sources)
    assert not findings, "\n".join(map(str, findings))


# Each checker must see the violation in a small example (and accept the safe twin).
BAD_EXAMPLES = {
    "shell": ("import subprocess, os\ndef f(p):\n    subprocess.run(['ls', p], shell=True)\n    os.system('ls ' + p)\n", 2),
    "subprocess_argv": ("import subprocess\nfrom subprocess import run\ndef f(p):\n    cmd = f'blender --python {p}'\n"
                        "    subprocess.Popen(cmd)\n    subprocess.run('ls ' + p)\n"
                        "    subprocess.check_output(' '.join(['ls', p]))\n", 4),
    "torch_load": ("import torch\nimport torch as T\nfrom torch import load\ndef f(p):\n    torch.load(p)\n"
                   "    torch.load(p, weights_only=False)\n", 4),
    "pickle": ("import pickle, numpy as np\nimport pickle as pk\nclass U(pickle.Unpickler):\n    pass\ndef f(p):\n"
               "    pickle.load(open(p, 'rb'))\n    np.load(p, allow_pickle=True)\n", 4),
    "no_server": ("import socket\nfrom http.server import HTTPServer\nimport asyncio\n"
                  "async def f():\n    await asyncio.start_server(None, '0.0.0.0', 8080)\n", 3),
}
SAFE_EXAMPLES = {
    "shell": "import subprocess\ndef f(p):\n    subprocess.run(['ls', p], shell=False)\n",
    "subprocess_argv": "import subprocess, sys\ndef f(p):\n    cmd = [sys.executable, '-m', 'x', str(p)]\n"
                       "    cmd += ['--out', p]\n    subprocess.run(cmd)\n",
    "torch_load": "import torch\ndef f(p):\n    return torch.load(p, map_location='cpu', weights_only=True)\n",
    "pickle": "import numpy as np\ndef f(p):\n    return np.load(p, allow_pickle=False)\n",
    "no_server": "import json\ndef f():\n    return json.dumps({})\n",
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_checker_catches_a_bad_example(rule):
    code, expected = BAD_EXAMPLES[rule]
    findings = RULES[rule]({"example.py": ast.parse(code)})
    assert len(findings) == expected, "\n".join(map(str, findings))
    assert RULES[rule]({"example.py": ast.parse(SAFE_EXAMPLES[rule])}) == []


def test_the_allowed_unpickler_is_behind_the_users_flag(sources):
    """The one place with Python's full unpickler is only reached when allow_pickle is set."""
    tree = sources["engine/body/convert.py"]
    callers = [c for c in calls(tree) if dotted(c.func) == "_trusted_load"]
    assert len(callers) == 1
    node = callers[0]
    while not isinstance(node, ast.ExceptHandler):
        node = node._parent  # type: ignore[attr-defined]
    assert dotted(node.type) == "UnsafePickleError"  # only after the restricted reader refused
    guard = node.body[0]
    assert isinstance(guard, ast.If) and ast.unparse(guard.test) == "not allow_pickle"
    assert isinstance(guard.body[-1], ast.Raise)


# -- job-folder paths -------------------------------------------------------------------------
ESCAPES = ["../x", "../../etc/passwd", "meshes/../../x", "/etc/passwd", "\\\\server\\share", "..\\..\\x",
           "meshes\\..\\..\\x", "C:\\Windows\\x", "C:/x", "a\x00b", "meshes/a\x00.npz", "", ".", "..", "meshes/",
           "meshes//x", "x" * 129, "meshes/" + "y" * 200, ".hidden", "~/x", "$HOME/x", "meshes/*.npz",
           "ｍｅｓｈｅｓ/x", "a b", "a;rm -rf", "-rf"]


@pytest.mark.parametrize("relative", ESCAPES)
def test_resolve_inside_refuses_escapes(tmp_path, relative):
    with pytest.raises(protocol.ProtocolError):
        protocol.resolve_inside(tmp_path, relative)


@pytest.mark.parametrize("value", [None, b"meshes/x.npz", 3, ["meshes"]])
def test_resolve_inside_refuses_non_strings(tmp_path, value):
    with pytest.raises(protocol.ProtocolError):
        protocol.resolve_inside(tmp_path, value)


def test_resolve_inside_refuses_a_symlink_out(tmp_path):
    root = tmp_path / "job"
    (root / "meshes").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (root / "meshes" / "link").symlink_to(outside)
    with pytest.raises(protocol.ProtocolError, match="escapes"):
        protocol.resolve_inside(root, "meshes/link/step_000001.npz")


def test_resolve_inside_accepts_the_real_layout(tmp_path):
    for rel in ("meshes/step_000200.npz", "result", "result/avatar.json", "checkpoints/ckpt_000010.pt",
                "fit_body/texture.png", "x" * 128):
        path = protocol.resolve_inside(tmp_path, rel)
        assert tmp_path.resolve() in path.parents


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "a\\b", "/", "a\x00", "x" * 129, "../a", "a..b", "-a",
                                  "é", None, 7])
def test_safe_name_refuses(name):
    with pytest.raises(protocol.ProtocolError):
        protocol.safe_name(name)


def test_safe_name_refuses_a_trailing_newline():
    with pytest.raises(protocol.ProtocolError):
        protocol.safe_name("step_000001.npz\n")


def test_pose_edit_bundle_name_is_checked(tmp_path):
    path = tmp_path / "pose_edit.json"
    edit = protocol.make_pose_edit(["root"], [np.eye(4).tolist()])
    edit["bundle"] = "../../elsewhere"
    path.write_text(json.dumps(edit))
    with pytest.raises(protocol.ProtocolError):
        protocol.read_pose_edit(path)


def test_batch_job_names_cannot_escape():
    from zeroavatar_blender.engine.pipeline import subject_name

    for photo in ("../../etc/passwd", "/abs/..", "..", "a/../../b.jpg", "~root.png", "名前.jpg", "x" * 300 + ".png",
                  "C:\\evil\\..\\x.jpg", ".hidden.png", "-rf.jpg"):
        protocol.safe_name(subject_name(Path(photo)))


# -- a tampered job folder ------------------------------------------------------------------------
class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_job_json_cannot_turn_on_the_full_unpickler(tmp_path, anny_body):
    """A job folder from elsewhere whose job.json says allow_pickle and names a booby-trapped
    model: `resume` must use the safe reader (the user did not pass --allow-pickle now)."""
    from PIL import Image

    from tests.engine.body.synthetic_smpl import build_model
    from tests.engine.photos import render_person

    marker = tmp_path / "payload_ran"
    model = dict(build_model("smpl"))
    model["bs_style"] = _Payload(os.mkdir, str(marker))
    evil = tmp_path / "SMPL_NEUTRAL.pkl"
    evil.write_bytes(pickle.dumps(model, protocol=2))
    job = tmp_path / "job"
    (job / "input").mkdir(parents=True)
    Image.fromarray(render_person(anny_body, 256, 320).rgb).save(job / "input" / "photo.png")
    (job / "job.json").write_text(json.dumps({"version": 1, "photo": "input/photo.png", "body": "smpl",
                                              "body_model_path": str(evil), "allow_pickle": True,
                                              "quality": "fast", "export": False}))
    proc = subprocess.run([sys.executable, "-m", "zeroavatar_blender.engine", "resume", str(job), "--progress", "none"],
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == protocol.EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert not marker.exists(), "the pickle's code ran"
    error = next(e for e in protocol.iter_events(job / "events.jsonl") if e["type"] == "error")
    assert "refusing to load" in error["message"] and "--allow-pickle" in error["hint"]
    assert not (job / "result").exists()


def test_allow_pickle_must_be_given_again_on_resume():
    from zeroavatar_blender.engine import cli
    from zeroavatar_blender.engine.pipeline import JobSettings

    for command in ("resume", "finalise", "optimise"):
        stored = JobSettings(allow_pickle=True)
        args = cli.build_parser().parse_args([command, "job"])
        assert cli.settings_for_existing_job(args, stored).allow_pickle is False
        args = cli.build_parser().parse_args([command, "job", "--allow-pickle"])
        assert cli.settings_for_existing_job(args, JobSettings()).allow_pickle is True
