#!/usr/bin/env bash
# Refreshes the copies of NVIDIA FLARE's example scripts that the compatibility tests run
# (tests/nvflare_examples.py): the Python files of each folder below, at each ref, from an NVFlare
# git folder or clone (Apache License 2.0: LICENSE here). Writes SOURCE.md with the commits.
#   tests/data/nvflare/update.sh /path/to/NVFlare/.git-or-bare-repo
set -euo pipefail
repo="${1:?usage: update.sh NVFLARE_GIT_DIR}"
here="$(cd "$(dirname "$0")" && pwd)"
git() { command git --git-dir "$repo" "$@"; }
folders_main=(examples/hello-world/hello-pt examples/hello-world/hello-numpy examples/hello-world/hello-lightning examples/advanced/job_api/pt)
folders_2_5=(examples/hello-world/hello-pt)
rm -rf "$here/main" "$here/2.5"
{
    echo "# NVIDIA FLARE example scripts (test inputs, unmodified)"
    echo
    echo "From https://github.com/NVIDIA/NVFlare under the Apache License 2.0 (LICENSE, copied from that"
    echo "repository). fl's tests port their import lines at test time and run them; nothing here is fl's"
    echo "code. Refresh with \`update.sh GIT_DIR\`; \`FL_NVFLARE_REPO=GIT_DIR\` runs the tests on another checkout."
    echo
} > "$here/SOURCE.md"
copy() {
    local ref="$1"; shift
    echo "- \`$ref\`: commit $(git rev-parse "$ref^{commit}") ($(git log -1 --format=%cs "$ref"))" >> "$here/SOURCE.md"
    for folder in "$@"; do
        git ls-tree -r --name-only "$ref:$folder" | grep '\.py$' | while read -r name; do
            mkdir -p "$(dirname "$here/$ref/$folder/$name")"
            git show "$ref:$folder/$name" > "$here/$ref/$folder/$name"
        done
        echo "  - $folder" >> "$here/SOURCE.md"
    done
}
copy main "${folders_main[@]}"
copy 2.5 "${folders_2_5[@]}"
git show main:LICENSE > "$here/LICENSE"
