# shellcheck shell=bash
# shellcheck disable=SC2034  # the settings here are used by the scripts that source this file
# Shared helpers and defaults for the local-cluster scripts. Source it; do not run it.
#
# Every setting can be overridden from the environment; README.md lists them.

LC_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

FL_CACHE_DIR="${FL_CACHE_DIR:-/root/.cache/fl}"
FL_CLUSTER_ROOT="${FL_CLUSTER_ROOT:-/tmp/fl-local-cluster}"
ROOT="$FL_CLUSTER_ROOT"

# Debian source version of the kubernetes package that is built (bookworm ships exactly this one).
FL_K8S_DEB_VERSION="${FL_K8S_DEB_VERSION:-1.20.5+really1.20.2-1.1+deb12u1}"
# The upstream version those sources are (what `kubectl version` reports for the server).
FL_K8S_VERSION="${FL_K8S_VERSION:-v1.20.2}"
K8S_CACHE="$FL_CACHE_DIR/k8s-$FL_K8S_DEB_VERSION"
K8S_BIN="$K8S_CACHE/bin"
K8S_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy pause)
# The pause (sandbox) image, made by build-k8s.sh from build/pause/linux/pause.c of the same sources.
PAUSE_IMAGE="localhost/fl-pause:3.2"

# Network namespace of the cluster, the node's address inside it, and the in-cluster ranges.
# None of these addresses exists outside the namespace; nothing is routed out of it.
FL_CLUSTER_NETNS="${FL_CLUSTER_NETNS:-fl-local-cluster}"
FL_CLUSTER_NODE_CIDR="${FL_CLUSTER_NODE_CIDR:-10.250.0.0/24}"
FL_CLUSTER_POD_CIDR="${FL_CLUSTER_POD_CIDR:-10.244.0.0/24}"
FL_CLUSTER_SERVICE_CIDR="${FL_CLUSTER_SERVICE_CIDR:-10.96.0.0/16}"
# host loopback port that forwards to the API server inside the namespace
FL_CLUSTER_API_PORT="${FL_CLUSTER_API_PORT:-16443}"
FL_CLUSTER_NODE_NAME="${FL_CLUSTER_NODE_NAME:-fl-node}"
NODE_NAME="$FL_CLUSTER_NODE_NAME"
# last level of kubelet's cgroupRoot (below the caller's memory cgroup): one per cluster, since down.sh
# kills whatever runs below it
FL_CLUSTER_CGROUP="${FL_CLUSTER_CGROUP:-$FL_CLUSTER_NETNS}"
# A second cluster joins a running one: a veth pair between the two network namespaces, with a /32 route
# to the other's node address only (nothing else is routed), and on each side only replies and
# connections forwarded to a NodePort pass that link (README.md, "Two clusters").
FL_CLUSTER_PEER_NETNS="${FL_CLUSTER_PEER_NETNS:-}"
FL_CLUSTER_PEER_NODE_CIDR="${FL_CLUSTER_PEER_NODE_CIDR:-10.250.0.0/24}"

log() { printf '[%s %s] %s\n' "$(date +%H:%M:%S)" "$(basename "$0")" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root"; }

# (Under `set -o pipefail`, never end a pipeline with a reader that stops early, such as `grep -q`,
#  `head` or `awk '{exit}'`: the writer may die of SIGPIPE and fail the pipeline at random.)

# ensure_pkgs PKG...: apt-get install the Debian packages that are not installed yet.
# Services that packages ship are never started: apt runs with a policy-rc.d that forbids it
# (the machine's own one when present, else a temporary one removed afterwards).
ensure_pkgs() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -c '^install ok installed$' >/dev/null || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  local tmp_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && tmp_policy=1
  fi
  local rc=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 || {
    log "install failed; running apt-get update and trying again"
    apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
  } || rc=$?
  [ $tmp_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  return $rc
}

# The Debian packages the running cluster needs (build-k8s.sh installs its own on top).
RUNTIME_PKGS=(etcd-server containerd runc containernetworking-plugins dnsmasq-base iptables conntrack socat
              iproute2 util-linux openssl jq curl ca-certificates)

# The memory cgroup of the calling process (cgroup v1); kubelet's cgroupRoot goes below it.
my_memory_cgroup() { awk -F: '$2=="memory"{print $3}' /proc/self/cgroup; }

# Run a command inside the cluster's network namespace (and, once up.sh made it, its mount namespace).
in_ns() {
  if [ -e "$ROOT/ns/mnt" ] && mountpoint -q "$ROOT/ns/mnt" 2>/dev/null; then
    nsenter --net="/run/netns/$FL_CLUSTER_NETNS" --mount="$ROOT/ns/mnt" "$@"
  else
    nsenter --net="/run/netns/$FL_CLUSTER_NETNS" "$@"
  fi
}

# The node's address: .10 of FL_CLUSTER_NODE_CIDR, or of the /24 CIDR given.
node_ip() { local cidr="${1:-$FL_CLUSTER_NODE_CIDR}" base; base="${cidr%/*}"; echo "${base%.*}.10"; }
# peer_link_name NODE_IP: the name of the link (in either namespace) that leads to the node NODE_IP
# ("xc" + the address in hex: unique per peer and within IFNAMSIZ)
peer_link_name() { local IFS=.; set -- $1; printf 'xc%02x%02x%02x%02x\n' "$1" "$2" "$3" "$4"; }
# peer_firewall ADD|DELETE NETNS LINK: in NETNS, only replies (and forwarded packets: NodePorts, which
# kube-proxy DNATs before INPUT) may come in through LINK; new connections to the node's own services
# (API server, kubelet, DNS) are dropped. DELETE removes every copy of both rules and never fails.
peer_firewall() {
  local ipt=(nsenter --net="/run/netns/$2" iptables -w) tag=(-m comment --comment "fl-peer $3")
  local accept=(INPUT -i "$3" -m conntrack --ctstate ESTABLISHED,RELATED "${tag[@]}" -j ACCEPT)
  local drop=(INPUT -i "$3" "${tag[@]}" -j DROP)
  if [ "$1" = ADD ]; then
    "${ipt[@]}" -A "${accept[@]}" && "${ipt[@]}" -A "${drop[@]}"
  else
    while "${ipt[@]}" -D "${accept[@]}" 2>/dev/null; do :; done
    while "${ipt[@]}" -D "${drop[@]}" 2>/dev/null; do :; done
  fi
}

# The Debian sources this machine's apt uses: prints "SUITE URI [SIGNED-BY]" for bookworm and
# bookworm-security, read from the deb822 (*.sources) and one-line (sources.list, *.list) files.
SRC_FILE=/etc/apt/sources.list.d/fl-local-cluster-deb-src.sources
debian_deb_sources() {
  { for f in /etc/apt/sources.list.d/*.sources; do
      if [ -f "$f" ] && [ "$f" != "$SRC_FILE" ]; then cat "$f"; echo; fi
    done; } | awk '
    function flush() {
      if (types ~ /(^| )deb( |$)/ && enabled != "no") {
        n = split(suites, s, " ")
        for (i = 1; i <= n; i++) if ((s[i] == "bookworm" || s[i] == "bookworm-security") && !(s[i] in uri)) {
          split(uris, u, " "); uri[s[i]] = u[1]; key[s[i]] = signed }
      }
      types = uris = suites = signed = enabled = ""
    }
    /^[ \t]*#/ { next }
    /^[ \t]*$/ { flush(); next }
    { k = tolower($1); sub(/:$/, "", k); $1 = ""; v = $0; sub(/^[ \t]+/, "", v)
      if (k == "types") types = v; else if (k == "uris") uris = v; else if (k == "suites") suites = v
      else if (k == "signed-by") signed = v; else if (k == "enabled") enabled = tolower(v) }
    END { flush(); for (x in uri) print x, uri[x], key[x] }'
  # one-line format: deb [options] URI suite components...
  { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } | awk '
    $1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                  if ($(i+1) == "bookworm" || $(i+1) == "bookworm-security") print $(i+1), $i, "" }'
}
# The mirror for bookworm (e.g. http://deb.debian.org/debian).
debian_mirror() { debian_deb_sources | awk '$1 == "bookworm" && !m {print $2; m = 1}'; }

# proc_starttime PID: the process's start time (field 22 of /proc/PID/stat), to tell it from a later
# process that gets the same PID
proc_starttime() { local s; s="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1; s="${s##*) }"; set -- $s; echo "${20}"; }
# pid_is PID START: the recorded process is still the same one and has not exited (a zombie waiting for
# init to reap it counts as exited)
pid_is() {
  local stat; stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"   # fields after "(comm) ": state is the 1st, starttime the 20th
  set -- "$2" $stat
  [ "$2" != Z ] && [ "${21}" = "$1" ]
}
# alive_in FILE: " name(pid)" for each process recorded in FILE ("name pid starttime" lines) that is
# still the same process; empty when none is (or FILE does not exist)
alive_in() {
  local n pid st out=""
  while read -r n pid st; do pid_is "$pid" "$st" && out+=" $n($pid)"; done < <(cat "$1" 2>/dev/null)
  printf '%s' "$out"
}
