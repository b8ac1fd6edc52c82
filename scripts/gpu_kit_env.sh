# Source on the lent GPU machine, from the repository root, with `.kit` carried
# (built by `bash ../shared/gpu-kit/build.sh .kit`): vLLM 0.26.0 from the kit, and this project
# importable with its `vllm.general_plugins` entry point registered (the kit has no pip index, so a
# minimal dist-info stands in for `pip install -e .`). The wheels in a carried `.whl/` are
# installed beside it: vLLM 0.26 imports compressed_tensors (which needs loguru) as soon as a
# quantization plugin is loaded, and the kit lacks both (benchmarks/results/vllm_gpu.md).
source .kit/activate.sh
if compgen -G ".whl/*.whl" > /dev/null; then
  _w4a8_site="${TMPDIR:-/tmp}/w4a8-site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$_w4a8_site" .whl/*.whl && export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$_w4a8_site"
  unset _w4a8_site
else
  echo "gpu_kit_env.sh: no .whl/*.whl carried: a W4A8 vLLM engine will fail to import" \
    "compressed_tensors (carry compressed-tensors and loguru wheels, see vllm_gpu.md)" >&2
fi
_w4a8_ep="${TMPDIR:-/tmp}/w4a8-entry-point"
_w4a8_version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
mkdir -p "$_w4a8_ep/w4a8_backend-${_w4a8_version}.dist-info"
printf 'Metadata-Version: 2.1\nName: w4a8-backend\nVersion: %s\n' "$_w4a8_version" \
  > "$_w4a8_ep/w4a8_backend-${_w4a8_version}.dist-info/METADATA"
printf '[vllm.general_plugins]\nw4a8_mxfp4 = w4a8_backend:register\n\n[console_scripts]\nw4a8-quantize = w4a8_backend.tools.quantize:main\nw4a8-env = w4a8_backend.tools.env:main\n' \
  > "$_w4a8_ep/w4a8_backend-${_w4a8_version}.dist-info/entry_points.txt"
export PYTHONPATH="$PWD:$_w4a8_ep:$PYTHONPATH"
unset _w4a8_ep _w4a8_version
