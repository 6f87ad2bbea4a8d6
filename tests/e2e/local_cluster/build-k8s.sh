#!/usr/bin/env bash
# Build Kubernetes (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy) and the
# static `pause` binary + OCI image from Debian's own `kubernetes` source package, and cache them in
#   ${FL_CACHE_DIR:-/root/.cache/fl}/k8s-<debian version>/{bin,images}
# No container registry and no Go module proxy is needed: the Debian source is fully vendored.
#
# - With the cache present this returns in well under a second and does nothing else.
# - Safe to re-run after an interruption: the source tree and Go build cache in
#   $FL_CACHE_DIR/k8s-<version>.work are reused (make is incremental), and the finished binaries are
#   moved into place with one rename at the very end, so a half-written cache is never seen.
# - Cold: about 12-15 minutes on 2 cores (the compile runs under `nice -n 10`).
# Prints the bin folder on stdout.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cache_ok() {
  [ -f "$K8S_CACHE/.complete" ] || return 1
  local b; for b in "${K8S_BINARIES[@]}"; do [ -x "$K8S_BIN/$b" ] || return 1; done
  [ -f "$K8S_CACHE/images/pause.oci.tar" ]
}

if cache_ok; then
  log "cached: $K8S_BIN"
  echo "$K8S_BIN"
  exit 0
fi

need_root
mkdir -p "$FL_CACHE_DIR"
# one build at a time on this machine
exec 9>"$FL_CACHE_DIR/.k8s-build.lock"
flock 9
if cache_ok; then echo "$K8S_BIN"; exit 0; fi   # another run finished it while we waited

WORK="$K8S_CACHE.work"
mkdir -p "$WORK"
rm -rf "$FL_CACHE_DIR"/.k8s-stage.*   # left by an interrupted run (we hold the lock)
T0=$SECONDS

# --- 1. deb-src for bookworm and bookworm-security, from the same mirror(s) the machine uses -------------
# Reads the machine's deb822 (*.sources) and one-line (sources.list, *.list) entries of type `deb`, keeps
# the URI (and Signed-By) used for each of the two suites, and writes deb-src entries for them.
write_deb_src() {
  local out
  out="$(debian_deb_sources)"
  local suite uri key done_suites=" " body=""
  while read -r suite uri key; do
    [ -n "$suite" ] || continue
    case "$done_suites" in *" $suite "*) continue ;; esac
    done_suites+="$suite "
    body+="Types: deb-src
URIs: $uri
Suites: $suite
Components: main
${key:+Signed-By: $key
}
"
  done <<<"$out"
  case "$done_suites" in *" bookworm "*) ;; *) die "no 'deb' source for bookworm found in /etc/apt/sources.list*" ;; esac
  printf '# Written by fl tests/e2e/local_cluster/build-k8s.sh: Debian sources for `apt-get source kubernetes`.\n%s' \
    "$body" > "$SRC_FILE.tmp"
  if ! cmp -s "$SRC_FILE.tmp" "$SRC_FILE" 2>/dev/null; then
    mv "$SRC_FILE.tmp" "$SRC_FILE"; log "wrote $SRC_FILE"; return 0
  fi
  rm -f "$SRC_FILE.tmp"; return 1
}
src_available() { apt-cache showsrc kubernetes 2>/dev/null | grep -cx "Version: $FL_K8S_DEB_VERSION" >/dev/null; }
if write_deb_src || ! src_available; then
  log "apt-get update"
  apt-get update -q >&2
fi
src_available ||
  die "source package kubernetes=$FL_K8S_DEB_VERSION not found (set FL_K8S_DEB_VERSION); available: $(apt-cache showsrc kubernetes 2>/dev/null | awk '/^Version:/{print $2}' | xargs)"

# --- 2. build tools -------------------------------------------------------------------------------------
ensure_pkgs golang-go rsync jq dpkg-dev gcc libc6-dev make file xz-utils

# --- 3. sources (extracted once; reused by a re-run) -----------------------------------------------------
SRC="$WORK/src"
if [ ! -f "$WORK/.extracted" ]; then
  rm -rf "$WORK/dl" "$SRC"
  mkdir -p "$WORK/dl"
  log "apt-get source kubernetes=$FL_K8S_DEB_VERSION"
  # -o APT::Sandbox::User=root: the work folder may not be readable by the _apt user
  (cd "$WORK/dl" && apt-get source -q -o APT::Sandbox::User=root "kubernetes=$FL_K8S_DEB_VERSION" >&2)
  d="$(find "$WORK/dl" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' -print -quit)"
  [ -n "$d" ] || die "apt-get source left no kubernetes-* folder in $WORK/dl"
  mv "$d" "$SRC"
  rm -rf "$WORK/dl"
  touch "$WORK/.extracted"
fi

# --- 4. compile -----------------------------------------------------------------------------------------
# Version stamping: without a .git folder the binaries would report v0.0.0; helm and clients read it.
export KUBE_GIT_VERSION="$FL_K8S_VERSION" KUBE_GIT_TREE_STATE=clean
KUBE_GIT_MAJOR="$(echo "${FL_K8S_VERSION#v}" | cut -d. -f1)"; KUBE_GIT_MINOR="$(echo "${FL_K8S_VERSION#v}" | cut -d. -f2)"
export KUBE_GIT_MAJOR KUBE_GIT_MINOR
# Offline: everything is vendored; never reach for a module proxy or another toolchain.
export GOPROXY=off GOSUMDB=off GOTOOLCHAIN=local GOFLAGS=-mod=vendor
# keep Go's caches inside the work folder (deleted at the end), not in the user's home
export GOCACHE="$WORK/gocache" GOPATH="$WORK/gopath"
log "make (nice -n 10): kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; ~12 min cold"
(cd "$SRC" && nice -n 10 make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kube-proxy" >&2)

PAUSE_C="$(find "$SRC/build/pause" -name pause.c | sort | sed -n 1p)"
[ -n "$PAUSE_C" ] || die "pause.c not found under $SRC/build/pause"
log "gcc -static $PAUSE_C"
nice -n 10 gcc -Os -Wall -Werror -static -DVERSION="fl-$FL_K8S_VERSION" -o "$WORK/pause" "$PAUSE_C"
strip "$WORK/pause"

# --- 5. the pause image: an OCI archive made by hand (FROM scratch + /pause) ------------------------------
# (no podman needed here; `ctr images import` takes it and names it $PAUSE_IMAGE)
make_pause_image() {
  local out="$1" t; t="$(mktemp -d "$WORK/oci.XXXX")"
  mkdir -p "$t/rootfs" "$t/oci/blobs/sha256"
  install -m 0755 "$WORK/pause" "$t/rootfs/pause"
  tar --numeric-owner --owner=0 --group=0 --mtime=@0 --sort=name -C "$t/rootfs" -cf "$t/layer.tar" pause
  local lsum lsize csum csize msum msize
  lsum="$(sha256sum "$t/layer.tar" | cut -d' ' -f1)"; lsize="$(stat -c %s "$t/layer.tar")"
  mv "$t/layer.tar" "$t/oci/blobs/sha256/$lsum"
  printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/pause"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$lsum" > "$t/config.json"
  csum="$(sha256sum "$t/config.json" | cut -d' ' -f1)"; csize="$(stat -c %s "$t/config.json")"
  mv "$t/config.json" "$t/oci/blobs/sha256/$csum"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "$csum" "$csize" "$lsum" "$lsize" > "$t/manifest.json"
  msum="$(sha256sum "$t/manifest.json" | cut -d' ' -f1)"; msize="$(stat -c %s "$t/manifest.json")"
  mv "$t/manifest.json" "$t/oci/blobs/sha256/$msum"
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$msum" "$msize" "$PAUSE_IMAGE" "${PAUSE_IMAGE##*:}" > "$t/oci/index.json"
  echo '{"imageLayoutVersion":"1.0.0"}' > "$t/oci/oci-layout"
  tar --numeric-owner --owner=0 --group=0 --mtime=@0 -C "$t/oci" -cf "$out" oci-layout index.json blobs
  rm -rf "$t"
}

# --- 6. move into place atomically ----------------------------------------------------------------------
STAGE="$(mktemp -d "$FL_CACHE_DIR/.k8s-stage.XXXX")"; chmod 0755 "$STAGE"
mkdir -p "$STAGE/bin" "$STAGE/images"
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
  install -m 0755 "$SRC/_output/bin/$b" "$STAGE/bin/$b"
done
install -m 0755 "$WORK/pause" "$STAGE/bin/pause"
make_pause_image "$STAGE/images/pause.oci.tar"
"$STAGE/bin/kube-apiserver" --version > "$STAGE/VERSION"
echo "$PAUSE_IMAGE" > "$STAGE/images/pause.name"
touch "$STAGE/.complete"
rm -rf "$K8S_CACHE"
mv "$STAGE" "$K8S_CACHE"
log "cached in $K8S_CACHE ($(cat "$K8S_CACHE/VERSION"), $((SECONDS - T0)) s); removing the work folder"
rm -rf "$WORK"
echo "$K8S_BIN"
