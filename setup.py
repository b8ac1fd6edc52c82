"""Build hook: ship csrc/ (the CUDA decode kernel's source, built just in time on the GPU
machine) inside the wheel as w4a8_backend/_csrc/. All other metadata is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).resolve().parent / "csrc"
CSRC_PATTERNS = ("*.cu", "*.h")


class BuildPyWithCsrc(build_py):
    def run(self):
        super().run()
        dest = Path(self.build_lib) / "w4a8_backend" / "_csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for pattern in CSRC_PATTERNS:
            for src in sorted(CSRC.glob(pattern)):
                self.copy_file(str(src), str(dest / src.name))


setup(cmdclass={"build_py": BuildPyWithCsrc})
