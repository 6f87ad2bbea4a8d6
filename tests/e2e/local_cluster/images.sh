#!/usr/bin/env bash
# Build container images with podman, without any registry, and import them into the local cluster.
#
#   images.sh build -t TAG [-f DOCKERFILE] [--build-arg K=V]... [--base-image REF]... [--no-import] CONTEXT
#       Build DOCKERFILE (default CONTEXT/Dockerfile) unchanged, with --pull=never. Its base images are
#       stood in for by a local Debian bookworm + python3 image: the value of `ARG BASE_IMAGE` (the
#       --build-arg BASE_IMAGE=... you pass, else the Dockerfile's default), every literal `FROM ref`
#       that is not a build stage or scratch, and each --base-image REF, are tagged as the stand-in when
#       no image of that name exists in the local podman storage. Then (unless --no-import) the image is
#       `podman save --format oci-archive`d and `ctr -n k8s.io images import`ed into the running cluster.
#   images.sh import TAG...        save + import images already built
#   images.sh standin [REF]...     only make the stand-in (and tag it as each REF); prints its name
#
# The stand-in (localhost/fl-python-standin:bookworm, a stand-in for python:3.11-slim):
#   localhost/debian-min:bookworm  <- `debootstrap --variant=minbase bookworm` from this machine's Debian
#                                     mirror; the rootfs tarball is cached in $FL_CACHE_DIR/images/
#   + python3, pip, venv, ca-certificates; `python`/`pip` in /usr/local/bin; no EXTERNALLY-MANAGED
#   + this machine's pip configuration (all of `pip config list`: files and PIP_* variables merged into
#     /etc/pip.conf), the CA bundle pip uses, and the constraint/requirement files it names; local
#     folders it names (find-links, file:// indexes) are bind-mounted read-only into every build.
#   So `pip install` inside a build reaches PyPI exactly the way this machine does.
#
# podman runs with its own configuration and storage in $FL_CACHE_DIR/podman (layer cache kept between
# runs), runc + cgroupfs, --isolation=chroot, host network; it never touches /var/lib/containers.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_root

STANDIN="localhost/fl-python-standin:bookworm"
DEBIAN_MIN="localhost/debian-min:bookworm"
PODMAN_HOME="$FL_CACHE_DIR/podman"
IMG_CACHE="$FL_CACHE_DIR/images"

setup_podman() {
  case "$FL_CACHE_DIR/" in /var/*|/run/*) die "FL_CACHE_DIR must not be under /var or /run (podman runs with /var overlaid)";; esac
  ensure_pkgs podman buildah runc debootstrap uidmap containerd
  mkdir -p "$PODMAN_HOME"/{storage,run,tmp,netconf} "$IMG_CACHE"
  cat > "$PODMAN_HOME/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[network]
network_config_dir = "$PODMAN_HOME/netconf"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$PODMAN_HOME/events.log"
tmp_dir = "$PODMAN_HOME/tmp"
CONF
  cat > "$PODMAN_HOME/storage.conf" <<CONF
[storage]
driver = "overlay"
runroot = "$PODMAN_HOME/run"
graphroot = "$PODMAN_HOME/storage"
[storage.options.overlay]
# no private bind mount of the storage folder onto itself (it would outlive podman)
skip_mount_home = "true"
mountopt = "nodev"
CONF
  cat > "$PODMAN_HOME/registries.conf" <<CONF
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"
CONF
  export CONTAINERS_CONF="$PODMAN_HOME/containers.conf"
  export CONTAINERS_STORAGE_CONF="$PODMAN_HOME/storage.conf"
  export CONTAINERS_REGISTRIES_CONF="$PODMAN_HOME/registries.conf"
}
# podman, in a private mount namespace of its own where /var is an overlay whose writes go to a
# throw-away folder: podman 4.3 / buildah write a blob-info cache to /var/lib/containers/cache and big
# temporary files to /var/tmp whatever their configuration says; this keeps the machine's /var
# untouched. Mounts that podman makes (layers during builds) also vanish with the namespace.
# _podman NICENESS ARGS...; `podman` = niceness 0, `podman_nice` = 10 (for builds)
_podman() {
  local ov rc=0; ov="$(mktemp -d "$PODMAN_HOME/.var.XXXX")"; mkdir "$ov/upper" "$ov/work"
  unshare --mount --propagation private sh -c '
    mount -t overlay fl-podman-var -o "lowerdir=/var,upperdir=$1/upper,workdir=$1/work" /var || exit 125
    n="$2"; shift 2; exec nice -n "$n" podman --cgroup-manager=cgroupfs "$@"' sh "$ov" "$@" || rc=$?
  rm -rf "$ov"
  return $rc
}
podman() { _podman 0 "$@"; }
podman_nice() { _podman 10 "$@"; }
have_image() { podman image exists "$1" 2>/dev/null; }

# Docker's normalisation of a reference: python:3.11-slim -> docker.io/library/python:3.11-slim
normalize_ref() {
  local ref="$1" first="${1%%/*}"
  if [ "$first" = "$ref" ]; then ref="docker.io/library/$ref"
  elif [[ "$first" != *.* && "$first" != *:* && "$first" != localhost ]]; then ref="docker.io/$ref"; fi
  [[ "${ref##*/}" == *:* || "$ref" == *@* ]] || ref="$ref:latest"
  echo "$ref"
}

# --- the stand-in --------------------------------------------------------------------------------------
make_debian_min() {
  have_image "$DEBIAN_MIN" && return 0
  local tarball="$IMG_CACHE/debian-min-bookworm.tar"
  if [ ! -f "$tarball" ]; then
    local mirror; mirror="$(debian_mirror)"; [ -n "$mirror" ] || die "no Debian mirror for bookworm in /etc/apt"
    local tmp; tmp="$(mktemp -d "$IMG_CACHE/.debootstrap.XXXX")"
    log "debootstrap --variant=minbase bookworm from $mirror (~30 s)"
    if ! nice -n 10 debootstrap --variant=minbase bookworm "$tmp/rootfs" "$mirror" > "$tmp/debootstrap.log" 2>&1; then
      tail -20 "$tmp/debootstrap.log" >&2
      findmnt -rn -o TARGET | awk -v r="$tmp/" 'index($0, r) == 1' | sort -r | xargs -r umount -l
      rm -rf "$tmp"; die "debootstrap failed"
    fi
    # debootstrap unmounts what it mounted; make sure, then pack
    findmnt -rn -o TARGET | awk -v r="$tmp/" 'index($0, r) == 1' | sort -r | xargs -r umount -l
    rm -rf "$tmp/rootfs/var/cache/apt/archives/"*.deb "$tmp/rootfs/var/lib/apt/lists/"*_Packages 2>/dev/null || true
    tar --numeric-owner -C "$tmp/rootfs" -cf "$tmp/rootfs.tar" .
    mv "$tmp/rootfs.tar" "$tarball"
    rm -rf "$tmp"
  fi
  log "podman import $tarball -> $DEBIAN_MIN"
  podman import -q --change 'CMD ["/bin/bash"]' "$tarball" "$DEBIAN_MIN" >/dev/null
}

# the machine's pip configuration -> $1/pip.conf, files it names -> $1/files/<abs path>,
# folders it names -> lines in $1/mounts
pip_config_for_build() {
  local ctx="$1"
  python3 - "$ctx" <<'PY'
import os, re, shutil, subprocess, sys
ctx = sys.argv[1]
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
conf = {}          # section -> {key: value}; environment (PIP_*) wins over files
env = {}
for line in out.splitlines():
    m = re.match(r"^([^.]*)\.([^=]+)='(.*)'$", line)
    if not m:
        continue
    section, key, value = m.groups()
    (env if section == ":env:" else conf.setdefault(section, {}))[key] = value
conf.setdefault("global", {}).update(env)
ca = "/etc/ssl/certs/ca-certificates.crt"
host_ca = conf["global"].get("cert") or os.environ.get("PIP_CERT") or ca
files, mounts = {}, set()
if os.path.isfile(host_ca):
    files[host_ca] = ca
conf["global"]["cert"] = ca
def local_path(v):
    return v[len("file://"):] if v.startswith("file://") else v if v.startswith("/") else None
for section, kv in conf.items():
    for key, value in kv.items():
        if key == "cert":
            continue
        for item in value.split():
            p = local_path(item)
            if p is None or not os.path.exists(p):
                continue
            if os.path.isdir(p):
                # A local index (".../simple") links its wheels relative to itself, e.g.
                # ../../files/x.whl: mount the repository around it, not only the index pages.
                real = os.path.realpath(p)
                mounts.add(os.path.dirname(real) if key.endswith("index-url") else real)
            else:
                files[p] = p
with open(os.path.join(ctx, "pip.conf"), "w") as f:
    f.write("# this machine's pip configuration (pip config list, PIP_* included), for builds with the stand-in\n")
    for section, kv in conf.items():
        f.write(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(kv.items())))
copies = []
for src, dst in files.items():
    rel = os.path.join("files", dst.lstrip("/"))
    os.makedirs(os.path.join(ctx, os.path.dirname(rel)), exist_ok=True)
    shutil.copyfile(src, os.path.join(ctx, rel))
    copies.append(f"COPY {rel} {dst}\n")
with open(os.path.join(ctx, "copies"), "w") as f:
    f.writelines(sorted(copies))
with open(os.path.join(ctx, "mounts"), "w") as f:
    f.writelines(f"{m}\n" for m in sorted(mounts))
PY
}

make_standin() {
  make_debian_min
  local ctx; ctx="$(mktemp -d)"
  pip_config_for_build "$ctx"
  cp "$ctx/mounts" "$PODMAN_HOME/pip-mounts"
  {
    echo "FROM $DEBIAN_MIN"
    echo 'RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv ca-certificates \'
    echo ' && rm -rf /var/lib/apt/lists/* /usr/lib/python3*/EXTERNALLY-MANAGED \'
    echo ' && ln -s /usr/bin/python3 /usr/local/bin/python && ln -s /usr/bin/pip3 /usr/local/bin/pip'
    cat "$ctx/copies"
    echo "COPY pip.conf /etc/pip.conf"
    echo "ENV LANG=C.UTF-8 PYTHONUNBUFFERED=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt"
    echo 'LABEL org.fl.standin=1'
    echo 'CMD ["python3"]'
  } > "$ctx/Dockerfile"
  log "building the stand-in $STANDIN"
  podman_nice build -q --isolation=chroot --pull=never --network=host --layers \
    -t "$STANDIN" "$ctx" >/dev/null || { rm -rf "$ctx"; die "stand-in build failed"; }
  rm -rf "$ctx"
}

# tag the stand-in as REF unless a real image (one without the stand-in label) of that name is in storage
standin_as() {
  local ref; ref="$(normalize_ref "$1")"
  if have_image "$ref" && [ "$(podman image inspect -f '{{index .Labels "org.fl.standin"}}' "$ref")" != 1 ]; then
    log "base $1: using the image $ref that is in local storage"
    return 0
  fi
  podman tag "$STANDIN" "$ref"
  log "base $1 -> $STANDIN"
}

import_image() {
  local tag="$1" sock="$ROOT/containerd/containerd.sock"
  [ -S "$sock" ] || die "the cluster is not up ($sock missing): run up.sh first, or pass --no-import"
  local full; full="$(normalize_ref "$tag")"
  local tmp; tmp="$(mktemp -d)"
  podman save --format oci-archive -o "$tmp/image.tar" "$tag" >/dev/null
  # podman names the image in the archive by its full reference; --base-name keeps that name
  ctr --address "$sock" --namespace k8s.io images import --base-name "${full%:*}" "$tmp/image.tar" >/dev/null
  rm -rf "$tmp"
  ctr --address "$sock" --namespace k8s.io images ls -q | grep -cx "$full" >/dev/null || die "import of $tag did not produce $full in containerd"
  log "imported $full into the cluster"
}

cmd="${1:-}"; shift || true
setup_podman
case "$cmd" in
  standin)
    make_standin
    for r in "$@"; do standin_as "$r"; done
    echo "$STANDIN" ;;
  import)
    [ $# -gt 0 ] || die "usage: $0 import TAG..."
    for t in "$@"; do import_image "$t"; done ;;
  build)
    T0=$SECONDS
    tag="" dockerfile="" context="" do_import=1 build_args=() bases=() base_arg=""
    while [ $# -gt 0 ]; do
      case "$1" in
        -t|--tag) tag="$2"; shift 2 ;;
        -f|--file) dockerfile="$2"; shift 2 ;;
        --build-arg) build_args+=(--build-arg "$2"); [[ "$2" == BASE_IMAGE=* ]] && base_arg="${2#BASE_IMAGE=}"; shift 2 ;;
        --base-image) bases+=("$2"); shift 2 ;;
        --no-import) do_import=0; shift ;;
        -*) die "unknown option $1" ;;
        *) [ -z "$context" ] || die "one CONTEXT only"; context="$1"; shift ;;
      esac
    done
    [ -n "$tag" ] && [ -n "$context" ] || die "usage: $0 build -t TAG [-f DOCKERFILE] [--build-arg K=V]... [--base-image REF]... [--no-import] CONTEXT"
    dockerfile="${dockerfile:-$context/Dockerfile}"
    [ -f "$dockerfile" ] || die "no Dockerfile at $dockerfile"
    # which base images to stand in for
    if [ -z "$base_arg" ]; then
      base_arg="$(sed -n -E 's/^[[:space:]]*ARG[[:space:]]+BASE_IMAGE=["'\'']?([^"'\''[:space:]]+).*/\1/Ip' "$dockerfile" | sed -n 1p)"
    fi
    [ -n "$base_arg" ] && bases+=("$base_arg")
    stages=" "
    while read -r ref alias; do
      [ -n "$ref" ] || continue
      case "$ref" in scratch|*'$'*) ;; *) [[ "$stages" == *" $ref "* ]] || bases+=("$ref") ;; esac
      [ -n "$alias" ] && stages+="$alias "
    done < <(sed -n -E 's/^[[:space:]]*FROM[[:space:]]+(--[^[:space:]]+[[:space:]]+)*([^[:space:]]+)([[:space:]]+AS[[:space:]]+([^[:space:]]+))?.*/\2 \4/Ip' "$dockerfile")
    make_standin
    for b in "${bases[@]}"; do standin_as "$b"; done
    mounts=()
    while read -r m; do [ -n "$m" ] && mounts+=(-v "$m:$m:ro"); done < "$PODMAN_HOME/pip-mounts"
    log "podman build -t $tag -f $dockerfile ${build_args[*]} $context"
    # buildah keeps `RUN --mount=type=cache` folders under $TMPDIR (default /var/tmp, which is a
    # throw-away overlay here): on disk in $PODMAN_HOME/tmp they last from one build to the next.
    TMPDIR="$PODMAN_HOME/tmp" podman_nice build --isolation=chroot --pull=never --network=host --layers \
      "${mounts[@]}" "${build_args[@]}" -f "$dockerfile" -t "$tag" "$context" >&2
    [ $do_import = 1 ] && import_image "$tag"
    log "done in $((SECONDS - T0)) s" ;;
  *) die "usage: $0 build|import|standin ... (see the header of this file)" ;;
esac
