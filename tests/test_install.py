"""Our import names cannot collide: the engine installs as gpt2_jit.tracer and gpt2_jit.kernels, so
the `kernels` (Hugging Face's) and `tracer` packages of PyPI can sit beside it."""
import base64
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN_STEP = textwrap.dedent("""
    import sys
    import numpy as np
    import gpt2
    cfg = gpt2.GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=64)
    model = gpt2.GPT(cfg, dtype="float32", seed=0)
    cm = gpt2.compile(model)
    opt = gpt2.AdamW(model.parameters(), lr=1e-2)
    x = np.random.default_rng(0).integers(0, 64, (2, 8)); y = np.roll(x, -1, axis=1)
    losses = []
    for _ in range(3):
        _, loss = cm(x, y); loss.backward(); opt.step(zero_grad=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert cm.trace_count == 1
    print(sorted(m for m in sys.modules if m.split(".")[0] in ("kernels", "tracer")))
""")


def decoys(tmp_path):
    """Packages named `kernels` and `tracer` that fail loudly when imported."""
    for name in ("kernels", "tracer"):
        (tmp_path / "decoys" / name).mkdir(parents=True)
        (tmp_path / "decoys" / name / "__init__.py").write_text(
            f"raise ImportError('the decoy {name} was imported')\n")
    return str(tmp_path / "decoys")


def run(code, cwd, env_extra, python=sys.executable):
    env = {**os.environ, **env_extra}
    return subprocess.run([python, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_decoy_kernels_and_tracer_first_on_the_path(tmp_path):
    path = decoys(tmp_path)
    env = {"PYTHONPATH": path}
    done = run(TRAIN_STEP, tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    # The control: the decoys are what a top-level import finds there.
    for name in ("kernels", "tracer"):
        found = run(f"import {name}", tmp_path, env)
        assert f"the decoy {name} was imported" in found.stderr


def record(dist_info):
    """{path: sha256 digest} from a wheel's RECORD (rows without a hash, RECORD itself, skipped)."""
    rows = (line.split(",") for line in (dist_info / "RECORD").read_text().splitlines())
    return {p: h.split("=", 1)[1] for p, h, *_ in rows if h}


def digest(path):
    raw = hashlib.sha256(path.read_bytes()).digest()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_wheel_installs_beside_hugging_face_kernels(tmp_path):
    """Our wheel goes into an environment holding Hugging Face's `kernels`; afterwards both
    distributions' files are exactly what their RECORDs list, and each import finds its own."""
    # Built from a copy: setuptools leaves a build/ folder in the tree it builds.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    source = tmp_path / "source"
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "wheel"), str(source)], capture_output=True,
                           text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheel").iterdir()
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    site = type(tmp_path)(site)

    # Hugging Face's kernels, copied file by file from this interpreter's installation.
    theirs = importlib.metadata.distribution("kernels")
    for file in theirs.files:
        target = site / file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(file.locate().read_bytes())
    their_dist_info = next(site.glob("kernels-*.dist-info"))
    their_files = record(their_dist_info)
    assert "kernels/__init__.py" in their_files

    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                                "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr
    our_files = record(next(site.glob("gpt2_jit-*.dist-info")))
    assert "gpt2_jit/kernels/__init__.py" in our_files and "gpt2/__init__.py" in our_files
    assert not {p for p in our_files if p.split("/")[0] in ("kernels", "tracer")}
    for files in (their_files, our_files):
        for p, want in files.items():
            assert digest(site / p) == want, p
    on_disk = {str(p.relative_to(site)) for p in (site / "kernels").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert on_disk == {p for p in their_files if p.startswith("kernels/")}

    # The environment's own packages first, this interpreter's (NumPy, Numba...) after them.
    paths = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "dependencies.pth").write_text("\n".join(sorted(paths)) + "\n")
    code = textwrap.dedent("""
        import gpt2, kernels, gpt2_jit.kernels
        print(gpt2.__file__); print(kernels.__file__); print(gpt2_jit.kernels.__file__)
        print(hasattr(kernels, "REFERENCE"), hasattr(gpt2_jit.kernels, "REFERENCE"))
    """)
    done = run(code, tmp_path, {"PYTHONPATH": ""}, python=str(python))
    assert done.returncode == 0, done.stderr
    ours, hf, engine, flags = done.stdout.strip().splitlines()[-4:]
    assert ours == str(site / "gpt2" / "__init__.py")
    assert hf == str(site / "kernels" / "__init__.py")
    assert engine == str(site / "gpt2_jit" / "kernels" / "__init__.py")
    assert flags == "False True"
