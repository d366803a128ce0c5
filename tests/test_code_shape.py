"""The code-shape rules of issue #10, checked so they stay true: no function in ``fused_bnlstm/ops/`` takes
more than 12 parameters, no Triton kernel more than 25, and no run of 6 identical lines stands twice in
``fused_bnlstm/`` or ``csrc/`` (a literal copy; ``duplicates`` also finds copies that differ in names)."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _functions(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
            count -= bool(args.args) and args.args[0].arg in ("self", "cls", "ctx")
            is_kernel = any("jit" in ast.unparse(d) or "heuristics" in ast.unparse(d) or "autotune" in ast.unparse(d)
                            for d in node.decorator_list)
            yield node.name, count, is_kernel


def test_parameter_counts():
    too_many = []
    for path in sorted((ROOT / "fused_bnlstm" / "ops").glob("*.py")):
        for name, count, is_kernel in _functions(path):
            limit = 25 if is_kernel else 12
            if count > limit:
                too_many.append(f"{path.name}:{name} takes {count} (at most {limit})")
    assert not too_many, too_many


def _significant_lines(path):
    comment = "//" if path.suffix in (".cpp", ".h", ".inc") else "#"
    for line in path.read_text().splitlines():
        text = re.sub(r"\s+", " ", line.strip())
        if text and not text.startswith((comment, '"""', "*", "/*")) and len(text) > 3:
            yield text


def test_no_six_identical_lines_twice():
    seen, repeated = {}, []
    for folder in ("fused_bnlstm", "csrc"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".cpp", ".h", ".inc") or "__pycache__" in path.parts:
                continue
            lines = list(_significant_lines(path))
            for i in range(len(lines) - 5):
                window = tuple(lines[i:i + 6])
                where = f"{path.relative_to(ROOT)}:{i}"
                if window in seen and not seen[window].startswith(f"{path.relative_to(ROOT)}:"):
                    repeated.append(f"{seen[window]} ~ {where}")
                elif window in seen and abs(int(seen[window].rsplit(":", 1)[1]) - i) >= 6:
                    repeated.append(f"{seen[window]} ~ {where}")
                seen.setdefault(window, where)
    assert not repeated, repeated
