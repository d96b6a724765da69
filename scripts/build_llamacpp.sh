#!/usr/bin/env bash
# Build llama.cpp's llama-server, llama-bench and llama-quantize (CPU only,
# Release) from the llama.cpp sources vendored in the PyPI sdist of
# llama-cpp-python. Only pip (the package registry) is used to fetch sources;
# nothing comes from GitHub.
#
#   scripts/build_llamacpp.sh [DEST]
#
# DEST (or $LLAMACPP_DIR) defaults to <repo>/.llamacpp. Layout:
#   DEST/src/    the downloaded sdist and its unpacked tree
#   DEST/build/  the cmake build tree (binaries in DEST/build/bin)
#   DEST/bin/    symlinks to the three binaries
#
# Environment knobs (all optional):
#   LLAMA_CPP_PYTHON_VERSION  sdist version to fetch          (default 0.3.36)
#   LLAMACPP_JOBS             parallel build jobs              (default: nproc)
#   LLAMACPP_NATIVE           GGML_NATIVE, i.e. -march=native  (default ON)
#   LLAMACPP_CMAKE_ARGS       extra cmake configure arguments
#   PYTHON                    python whose pip is used         (default python3,
#                             falling back to <repo>/.venv/bin/python)
#
# Idempotent: the sdist is downloaded/unpacked once per version; the build tree
# is reused (ninja rebuilds nothing when up to date) and wiped only when the
# version or the configure flags change. The last lines printed are the
# binaries' paths.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-${LLAMACPP_DIR:-$repo/.llamacpp}}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
jobs="${LLAMACPP_JOBS:-$(nproc 2>/dev/null || echo 2)}"
native="${LLAMACPP_NATIVE:-ON}"
targets=(llama-server llama-bench llama-batched-bench llama-quantize)

log() { echo "[build_llamacpp] $*" >&2; }

# --- tools -----------------------------------------------------------------
command -v cmake >/dev/null || { log "cmake not found"; exit 1; }
if command -v c++ >/dev/null || command -v g++ >/dev/null; then :; else
    log "no C++ compiler (c++/g++) found"; exit 1
fi
python="${PYTHON:-python3}"
if ! "$python" -m pip --version >/dev/null 2>&1; then
    if [ -x "$repo/.venv/bin/python" ] && "$repo/.venv/bin/python" -m pip --version >/dev/null 2>&1; then
        python="$repo/.venv/bin/python"
    else
        log "no usable pip (tried $python -m pip and $repo/.venv/bin/python -m pip)"; exit 1
    fi
fi
generator=()
if command -v ninja >/dev/null; then generator=(-G Ninja); fi

# --- 1. sources from the PyPI sdist ------------------------------------------
src_root="$dest/src"
sdist_dir="$src_root/llama_cpp_python-$version"
llama_src="$sdist_dir/vendor/llama.cpp"
if [ ! -f "$llama_src/CMakeLists.txt" ]; then
    mkdir -p "$src_root"
    sdist="$src_root/llama_cpp_python-$version.tar.gz"
    if [ ! -f "$sdist" ]; then
        log "downloading llama-cpp-python==$version sdist with $python -m pip ..."
        # pip prepares the sdist's metadata (fetches scikit-build-core from the
        # registry into an isolated env); it does not compile anything.
        "$python" -m pip download "llama-cpp-python==$version" --no-deps \
            --no-binary :all: -d "$src_root" >&2
    fi
    [ -f "$sdist" ] || { log "expected $sdist after pip download"; exit 1; }
    log "unpacking $sdist ..."
    rm -rf "$sdist_dir.partial"
    mkdir -p "$sdist_dir.partial"
    tar -xzf "$sdist" -C "$sdist_dir.partial"
    rm -rf "$sdist_dir"
    mv "$sdist_dir.partial/llama_cpp_python-$version" "$sdist_dir"
    rmdir "$sdist_dir.partial"
    [ -f "$llama_src/CMakeLists.txt" ] || { log "no vendor/llama.cpp in the sdist"; exit 1; }
fi

# --- 2. configure + build ----------------------------------------------------
build="$dest/build"
# Offline, CPU-only: no CUDA, no curl/openssl, no web UI (the prebuilt UI would
# be downloaded from Hugging Face at build time; without it llama-server still
# serves the HTTP API, just no browser UI at /).
cmake_args=(
    -DCMAKE_BUILD_TYPE=Release
    -DGGML_NATIVE="$native"
    -DGGML_CUDA=OFF
    -DBUILD_SHARED_LIBS=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_OPENSSL=OFF
    -DGGML_CCACHE=OFF
)
# shellcheck disable=SC2206
extra=(${LLAMACPP_CMAKE_ARGS:-})
config_key="$(printf '%s\n' "$version" "$llama_src" "${generator[@]}" "${cmake_args[@]}" "${extra[@]}" | sha256sum | cut -c1-16)"
stamp="$build/.build_llamacpp-config"
if [ -d "$build" ] && [ "$(cat "$stamp" 2>/dev/null)" != "$config_key" ]; then
    log "configuration changed; wiping $build"
    rm -rf "$build"
fi
if [ ! -f "$build/CMakeCache.txt" ] || [ ! -f "$stamp" ]; then
    log "configuring $llama_src -> $build"
    cmake -S "$llama_src" -B "$build" "${generator[@]}" "${cmake_args[@]}" "${extra[@]}" >&2
    echo "$config_key" > "$stamp"
fi
log "building ${targets[*]} with $jobs jobs (a first build takes ~10-20 min on 2 cores) ..."
start=$(date +%s)
cmake --build "$build" -j "$jobs" --target "${targets[@]}" >&2
log "build step took $(( $(date +%s) - start ))s"

# --- 3. report ---------------------------------------------------------------
mkdir -p "$dest/bin"
for t in "${targets[@]}"; do
    [ -x "$build/bin/$t" ] || { log "missing $build/bin/$t"; exit 1; }
    ln -sfn "$build/bin/$t" "$dest/bin/$t"
done
log "binaries (also symlinked in $dest/bin):"
for t in "${targets[@]}"; do
    echo "$build/bin/$t"
done
