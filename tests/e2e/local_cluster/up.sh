#!/usr/bin/env bash
# Start a single-node Kubernetes 1.20 inside a network namespace of its own, on this machine, without
# Docker, kind or a registry. Prints the admin kubeconfig path ($ROOT/admin.kubeconfig) on stdout.
#
# What runs, all inside netns $FL_CLUSTER_NETNS (node address .10 of $FL_CLUSTER_NODE_CIDR on a veth whose
# peer is in the same namespace, so nothing is routed out of it) and inside a private mount namespace
# ($ROOT/ns/mnt) where /run is a tmpfs, /var is an overlay whose writes land in $ROOT/ns/var.upper,
# /etc/resolv.conf points at the cluster DNS, and the 6 kernel sysctls that kubelet insists on changing
# are plain files (so the machine's own vm/kernel settings are never touched):
#   etcd, kube-apiserver (static token auth, Node+RBAC, own CA), kube-controller-manager, kube-scheduler,
#   containerd (own root/state/socket, runc, cgroupfs, restrict_oom_score_adj), kubelet (cgroupfs,
#   cgroupRoot below this process's memory cgroup), kube-proxy (iptables), dnsmasq + dns-sync.sh.
# With FL_CLUSTER_PEER_NETNS (a running cluster's netns): a veth pair into it and /32 routes between the
# two node addresses only (README.md, "Two clusters").
# Plus, in the host namespace, a socat on 127.0.0.1:$FL_CLUSTER_API_PORT that forwards (through a unix
# socket) to the API server, so kubectl/helm/python clients on the host use the kubeconfig directly.
#
# Every PID started is in $ROOT/pids ("name pid starttime"); down.sh stops them. On failure this prints
# what it waited for plus the log tails and runs down.sh (unless FL_CLUSTER_KEEP_ON_FAILURE=1).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_root
T0=$SECONDS
UP_DEADLINE="${FL_CLUSTER_UP_TIMEOUT:-300}"   # seconds for the start (after any build), waits included

NODE_IP="$(node_ip)"
NETNS="$FL_CLUSTER_NETNS"
CGROOT="$(my_memory_cgroup)"; CGROOT="${CGROOT%/}/$FL_CLUSTER_CGROUP"

# ---------------------------------------------------------------------------------------------------------
# 0. preconditions
case "$ROOT" in /var|/var/*|/run|/run/*|/) die "FL_CLUSTER_ROOT must not be under /var or /run (they are overlaid inside the cluster)";; esac
[ "${FL_CLUSTER_NODE_CIDR#*/}" = 24 ] || die "FL_CLUSTER_NODE_CIDR must be a /24"
# Left over from a run that ended without down.sh (killed, machine session ended): if none of the
# processes it recorded is still the same process, the state is stale and down.sh clears it (it only
# ever acts on what that run recorded). A cluster that is still running is never touched.
if [ -s "$ROOT/pids" ]; then
  alive="$(alive_in "$ROOT/pids")"
  [ -z "$alive" ] || die "a cluster is running from $ROOT (alive:$alive); run down.sh first, or set FL_CLUSTER_ROOT"
  log "stale state in $ROOT from a run that did not stop (none of its processes is alive): clearing it with down.sh"
  "$LC_DIR/down.sh" >&2 || die "down.sh could not clear the stale state in $ROOT"
fi
if ip netns list | awk '{print $1}' | grep -cx "$NETNS" >/dev/null; then die "netns $NETNS exists already; run down.sh first"; fi
# the private ranges must not clash with a route of this machine (they only ever exist inside the netns,
# but a clash would make debugging from the host confusing and could hide a real network)
python3 - "$FL_CLUSTER_NODE_CIDR" "$FL_CLUSTER_POD_CIDR" "$FL_CLUSTER_SERVICE_CIDR" <<'PY' || die "address ranges clash with this machine's routes (set FL_CLUSTER_*_CIDR)"
import ipaddress, subprocess, sys
mine = [ipaddress.ip_network(c) for c in sys.argv[1:]]
for line in subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout.splitlines():
    dst = line.split()[0] if line.split() else ""
    if dst in ("default", "broadcast", "local", "unreachable", "multicast"):
        dst = line.split()[1] if dst != "default" else ""
    try:
        net = ipaddress.ip_network(dst, strict=False)
    except ValueError:
        continue
    if net.prefixlen == 0 or net.is_loopback:
        continue
    for m in mine:
        if m.overlaps(net):
            print(f"{m} overlaps the route {line!r}", file=sys.stderr); sys.exit(1)
PY
if [ -n "$FL_CLUSTER_PEER_NETNS" ]; then
  PEER_IP="$(node_ip "$FL_CLUSTER_PEER_NODE_CIDR")"
  ip netns list | awk '{print $1}' | grep -cx "$FL_CLUSTER_PEER_NETNS" >/dev/null ||
    die "FL_CLUSTER_PEER_NETNS=$FL_CLUSTER_PEER_NETNS: no such network namespace (start that cluster first)"
  python3 - "$PEER_IP" "$FL_CLUSTER_NODE_CIDR" "$FL_CLUSTER_POD_CIDR" "$FL_CLUSTER_SERVICE_CIDR" <<'PY' || die "FL_CLUSTER_PEER_NODE_CIDR must not overlap this cluster's ranges"
import ipaddress, sys
peer = ipaddress.ip_address(sys.argv[1])
for cidr in sys.argv[2:]:
    if peer in ipaddress.ip_network(cidr):
        sys.exit(f"the peer's node address {peer} (FL_CLUSTER_PEER_NODE_CIDR) lies in this cluster's range {cidr}")
PY
fi
if ss -Hltn "sport = :$FL_CLUSTER_API_PORT" | grep -c . >/dev/null; then
  die "127.0.0.1:$FL_CLUSTER_API_PORT is taken on this machine (set FL_CLUSTER_API_PORT)"
fi

ensure_pkgs "${RUNTIME_PKGS[@]}"
K8S_BIN="$("$LC_DIR/build-k8s.sh")"
KUBECTL="$("$LC_DIR/tools.sh" kubectl)"
T_START=$SECONDS   # the deadline counts from here, after any build

# a fresh ROOT (never rm -rf through a mount)
if [ -e "$ROOT" ]; then
  if findmnt -rn -o TARGET | grep -c "^$ROOT\(/\|$\)" >/dev/null; then die "mounts left under $ROOT; run down.sh first"; fi
  rm -rf "$ROOT"
fi
mkdir -p "$ROOT"/{logs,etc,pki,run,etcd,kubelet,containerd,dns/hosts,ns/var.upper,ns/var.work,ns/sysctl,cni}
: > "$ROOT/pids"
log "ROOT=$ROOT netns=$NETNS node=$NODE_IP cgroupRoot=$CGROOT"

# state that down.sh needs even after a failed start
{
  echo "NETNS=$NETNS"
  echo "CGROOT=$CGROOT"
  echo "RUN_NETNS_WAS_MOUNTED=$(mountpoint -q /run/netns 2>/dev/null && echo 1 || echo 0)"
  echo "RUN_NETNS_EXISTED=$([ -d /run/netns ] && echo 1 || echo 0)"
} > "$ROOT/state.env"

FAILED_WAIT=""
on_exit() {
  local rc=$?
  [ $rc -eq 0 ] && return 0
  log "FAILED after $((SECONDS - T0)) s${FAILED_WAIT:+ while waiting for: $FAILED_WAIT}"
  local f; for f in "$ROOT"/logs/*.log; do
    [ -f "$f" ] || continue; echo "----- tail $f" >&2; tail -n 15 "$f" >&2
  done
  if [ "${FL_CLUSTER_KEEP_ON_FAILURE:-0}" != 1 ]; then
    log "cleaning up with down.sh (FL_CLUSTER_KEEP_ON_FAILURE=1 keeps it for debugging)"
    "$LC_DIR/down.sh" >&2 || true
  fi
  exit $rc
}
trap on_exit EXIT

# wait_for WHAT SECONDS CMD...: poll CMD until it succeeds, within the overall deadline
wait_for() {
  local what="$1" secs="$2"; shift 2
  local end=$((SECONDS + secs)); [ $end -gt $((T_START + UP_DEADLINE)) ] && end=$((T_START + UP_DEADLINE))
  FAILED_WAIT="$what"
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || { log "gave up waiting for $what"; return 1; }
    sleep 0.5
  done
  FAILED_WAIT=""
  log "ready: $what ($((SECONDS - T_START)) s)"
}

# ---------------------------------------------------------------------------------------------------------
# 1. network namespace: node0 <-> node0-peer, both ends inside it; the default route leads only to the peer
ip netns add "$NETNS"
echo "NETNS_CREATED=1" >> "$ROOT/state.env"
ip -n "$NETNS" link set lo up
ip -n "$NETNS" link add node0 type veth peer name node0-peer
ip -n "$NETNS" addr add "$NODE_IP/24" dev node0
ip -n "$NETNS" link set node0 up
ip -n "$NETNS" link set node0-peer up
ip -n "$NETNS" route add default dev node0
# 1b. (FL_CLUSTER_PEER_NETNS) a veth pair to the peer cluster's namespace; each end carries its own node's
# address (/32: the source of masqueraded pod traffic) and a /32 route to the other node only
if [ -n "$FL_CLUSTER_PEER_NETNS" ]; then
  LINK_HERE="$(peer_link_name "$PEER_IP")" LINK_PEER="$(peer_link_name "$NODE_IP")"
  { echo "PEER_NETNS=$FL_CLUSTER_PEER_NETNS"; echo "PEER_LINK=$LINK_PEER"; } >> "$ROOT/state.env"
  ip -n "$NETNS" link add "$LINK_HERE" type veth peer name "$LINK_PEER" netns "$FL_CLUSTER_PEER_NETNS"
  ip -n "$NETNS" addr add "$NODE_IP/32" dev "$LINK_HERE"
  ip -n "$FL_CLUSTER_PEER_NETNS" addr add "$PEER_IP/32" dev "$LINK_PEER"
  ip -n "$NETNS" link set "$LINK_HERE" up
  ip -n "$FL_CLUSTER_PEER_NETNS" link set "$LINK_PEER" up
  ip -n "$NETNS" route add "$PEER_IP/32" dev "$LINK_HERE" src "$NODE_IP"
  ip -n "$FL_CLUSTER_PEER_NETNS" route add "$NODE_IP/32" dev "$LINK_PEER" src "$PEER_IP"
  peer_firewall ADD "$NETNS" "$LINK_HERE"
  peer_firewall ADD "$FL_CLUSTER_PEER_NETNS" "$LINK_PEER"
  log "linked to netns $FL_CLUSTER_PEER_NETNS: $LINK_HERE <-> $LINK_PEER, route to $PEER_IP only"
fi
# bridged pod traffic must pass through iptables (kube-proxy); per-namespace sysctls only
nsenter --net="/run/netns/$NETNS" sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward; [ ! -e /proc/sys/net/bridge/bridge-nf-call-iptables ] || echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables'

# ---------------------------------------------------------------------------------------------------------
# 2. private mount namespace, pinned at $ROOT/ns/mnt (the pin must sit on a private mount)
mount --bind "$ROOT/ns" "$ROOT/ns"
mount --make-private "$ROOT/ns"
touch "$ROOT/ns/mnt"
printf 'nameserver %s\nsearch svc.cluster.local cluster.local\noptions ndots:5\n' "$NODE_IP" > "$ROOT/etc/resolv.conf"
# kubelet (setupKernelTunables) writes these 6 machine-wide sysctls; it gets copies instead
SYSCTLS="vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys kernel/keys/root_maxbytes"
for s in $SYSCTLS; do cat "/proc/sys/$s" > "$ROOT/ns/sysctl/${s//\//.}"; done
unshare --mount="$ROOT/ns/mnt" --propagation private sh -euc '
  ROOT="$1"; SYSCTLS="$2"
  mount -t tmpfs -o mode=0755,size=256m fl-run /run
  mount -t overlay fl-var -o "lowerdir=/var,upperdir=$ROOT/ns/var.upper,workdir=$ROOT/ns/var.work" /var
  mount --bind "$ROOT/etc/resolv.conf" /etc/resolv.conf
  for s in $SYSCTLS; do mount --bind "$ROOT/ns/sysctl/$(echo $s | tr / .)" "/proc/sys/$s"; done
' sh "$ROOT" "$SYSCTLS"
echo "MNTNS_CREATED=1" >> "$ROOT/state.env"

# start NAME CMD...: run CMD in both namespaces, in its own session (so down.sh can stop its whole
# process group), output in $ROOT/logs/NAME.log, PID recorded with its start time
start() {
  local name="$1"; shift
  setsid nsenter --net="/run/netns/$NETNS" --mount="$ROOT/ns/mnt" "$@" > "$ROOT/logs/$name.log" 2>&1 < /dev/null &
  record_pid "$name" $!
}
record_pid() {
  local st; st="$(proc_starttime "$2" || echo 0)"
  echo "$1 $2 $st" >> "$ROOT/pids"
}

# ---------------------------------------------------------------------------------------------------------
# 3. PKI: a CA, the API server's serving certificate, the service-account key pair; static tokens
(
  cd "$ROOT/pki"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 -subj "/CN=fl-local-cluster-ca" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,IP:%s,IP:%s,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n' \
    "$NODE_IP" "$(python3 -c "import ipaddress,sys; print(ipaddress.ip_network(sys.argv[1])[1])" "$FL_CLUSTER_SERVICE_CIDR")" > san.ext
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 30 -extfile san.ext 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
)
tok() { openssl rand -hex 16; }
ADMIN_TOKEN="$(tok)"
{
  echo "$ADMIN_TOKEN,fl-admin,fl-admin,\"system:masters\""
  echo "$(tok),system:node:$NODE_NAME,kubelet,\"system:nodes\""
  echo "$(tok),system:kube-controller-manager,kube-controller-manager"
  echo "$(tok),system:kube-scheduler,kube-scheduler"
  echo "$(tok),system:kube-proxy,kube-proxy"
} > "$ROOT/pki/tokens.csv"
chmod 600 "$ROOT/pki/tokens.csv" "$ROOT/pki/"*.key
# kubeconfig NAME TOKEN: one per identity; all use https://127.0.0.1:<port> (inside the netns that is the
# API server itself, on the host it is the socat forwarder, same port)
kubeconfig() {
  cat > "$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: fl-local
  cluster:
    server: https://127.0.0.1:$FL_CLUSTER_API_PORT
    certificate-authority-data: $(base64 -w0 "$ROOT/pki/ca.crt")
users:
- name: $3
  user:
    token: $2
contexts:
- name: fl-local
  context: {cluster: fl-local, user: $3}
current-context: fl-local
KC
  chmod 600 "$1"
}
user_token() { awk -F, -v u="$1" '$2==u{print $1}' "$ROOT/pki/tokens.csv"; }
kubeconfig "$ROOT/admin.kubeconfig" "$ADMIN_TOKEN" fl-admin
kubeconfig "$ROOT/etc/kubelet.kubeconfig" "$(user_token "system:node:$NODE_NAME")" kubelet
kubeconfig "$ROOT/etc/controller-manager.kubeconfig" "$(user_token system:kube-controller-manager)" kube-controller-manager
kubeconfig "$ROOT/etc/scheduler.kubeconfig" "$(user_token system:kube-scheduler)" kube-scheduler
kubeconfig "$ROOT/etc/proxy.kubeconfig" "$(user_token system:kube-proxy)" kube-proxy
# (--cache-dir: kubectl's discovery cache stays in ROOT, not in ~/.kube)
K() { "$KUBECTL" --kubeconfig="$ROOT/admin.kubeconfig" --cache-dir="$ROOT/kube-cache" --request-timeout=10s "$@"; }

# ---------------------------------------------------------------------------------------------------------
# 4. etcd and the control plane (all on the namespace's loopback / node address)
start etcd etcd --name fl --data-dir "$ROOT/etcd" \
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster fl=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381 \
  --quota-backend-bytes=2147483648 --snapshot-count=10000
wait_for "etcd health" 30 in_ns curl -sf http://127.0.0.1:2381/health

start kube-apiserver "$K8S_BIN/kube-apiserver" \
  --etcd-servers=http://127.0.0.1:2379 --bind-address=0.0.0.0 --secure-port="$FL_CLUSTER_API_PORT" \
  --advertise-address="$NODE_IP" --insecure-port=0 \
  --tls-cert-file="$ROOT/pki/apiserver.crt" --tls-private-key-file="$ROOT/pki/apiserver.key" \
  --client-ca-file="$ROOT/pki/ca.crt" --token-auth-file="$ROOT/pki/tokens.csv" \
  --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$ROOT/pki/sa.pub" --service-account-signing-key-file="$ROOT/pki/sa.key" \
  --service-cluster-ip-range="$FL_CLUSTER_SERVICE_CIDR" --allow-privileged=true \
  --kubelet-preferred-address-types=InternalIP --profiling=false --event-ttl=1h
wait_for "kube-apiserver /readyz" 90 in_ns curl -sf --cacert "$ROOT/pki/ca.crt" \
  -H "Authorization: Bearer $ADMIN_TOKEN" "https://127.0.0.1:$FL_CLUSTER_API_PORT/readyz"

# host 127.0.0.1:PORT -> unix socket -> API server in the netns (loopback traffic only)
setsid nsenter --net="/run/netns/$NETNS" socat "UNIX-LISTEN:$ROOT/run/apiserver.sock,fork,mode=600" \
  "TCP:127.0.0.1:$FL_CLUSTER_API_PORT" > "$ROOT/logs/forward-ns.log" 2>&1 < /dev/null &
record_pid forward-ns $!
setsid socat "TCP-LISTEN:$FL_CLUSTER_API_PORT,bind=127.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$ROOT/run/apiserver.sock" \
  > "$ROOT/logs/forward-host.log" 2>&1 < /dev/null &
record_pid forward-host $!

start kube-controller-manager "$K8S_BIN/kube-controller-manager" \
  --kubeconfig="$ROOT/etc/controller-manager.kubeconfig" \
  --authentication-kubeconfig="$ROOT/etc/controller-manager.kubeconfig" \
  --authorization-kubeconfig="$ROOT/etc/controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port=10257 --port=0 \
  --service-account-private-key-file="$ROOT/pki/sa.key" --root-ca-file="$ROOT/pki/ca.crt" \
  --use-service-account-credentials=true --cluster-cidr="$FL_CLUSTER_POD_CIDR" \
  --service-cluster-ip-range="$FL_CLUSTER_SERVICE_CIDR" --allocate-node-cidrs=false \
  --controllers='*,-nodeipam,-cloud-node-lifecycle' --leader-elect=false
start kube-scheduler "$K8S_BIN/kube-scheduler" \
  --kubeconfig="$ROOT/etc/scheduler.kubeconfig" \
  --authentication-kubeconfig="$ROOT/etc/scheduler.kubeconfig" \
  --authorization-kubeconfig="$ROOT/etc/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port=10259 --port=0 --leader-elect=false

# ---------------------------------------------------------------------------------------------------------
# 5. containerd + CNI + the pause image
cat > "$ROOT/etc/cni-10-fl.conflist" <<CNI
{"cniVersion":"0.4.0","name":"fl-pods","plugins":[
 {"type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":true,"hairpinMode":true,
  "ipam":{"type":"host-local","dataDir":"$ROOT/cni/ipam","ranges":[[{"subnet":"$FL_CLUSTER_POD_CIDR"}]],
          "routes":[{"dst":"0.0.0.0/0"}]}},
 {"type":"portmap","capabilities":{"portMappings":true}}]}
CNI
mkdir -p "$ROOT/etc/cni/net.d" && mv "$ROOT/etc/cni-10-fl.conflist" "$ROOT/etc/cni/net.d/10-fl.conflist"
C="$ROOT/containerd"
cat > "$ROOT/etc/containerd.toml" <<TOML
version = 2
root = "$C/root"
state = "$C/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$C/containerd.sock"
[ttrpc]
  address = "$C/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$C/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_tcp_service = true
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$ROOT/etc/cni/net.d"
TOML
start containerd containerd --config "$ROOT/etc/containerd.toml"
CTR=(ctr --address "$C/containerd.sock" --namespace k8s.io)
wait_for "containerd socket" 30 "${CTR[@]}" version
"${CTR[@]}" images import "$(dirname "$K8S_BIN")/images/pause.oci.tar" >/dev/null
"${CTR[@]}" images ls -q | grep -cx "$PAUSE_IMAGE" >/dev/null || die "pause image $PAUSE_IMAGE missing after import"

# ---------------------------------------------------------------------------------------------------------
# 6. kubelet and kube-proxy
# kubelet requires cgroupRoot to exist in every cgroup v1 hierarchy: create it. Record every level of the
# path that does not exist yet in any hierarchy (runc also makes them in the cgroup2 "unified" one), so
# that down.sh removes exactly those.
: > "$ROOT/cgroups-created"
for mnt in /sys/fs/cgroup/*; do
  [ -f "$mnt/cgroup.procs" ] || continue
  v1=1; [ "$(stat -f -c %T "$mnt")" = cgroup2fs ] && v1=0
  path="$mnt"
  IFS=/ read -r -a parts <<<"${CGROOT#/}"
  for part in "${parts[@]}"; do
    parent="$path"; path="$path/$part"
    [ -d "$path" ] && continue
    echo "$path" >> "$ROOT/cgroups-created"
    [ $v1 = 1 ] || continue
    mkdir "$path"
    if [ -f "$path/cpuset.cpus" ]; then   # a new cpuset is empty until given cpus and mems
      cat "$parent/cpuset.cpus" > "$path/cpuset.cpus"; cat "$parent/cpuset.mems" > "$path/cpuset.mems"
    fi
  done
done
cat > "$ROOT/etc/kubelet-config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
# reachable only inside the netns
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
cgroupsPerQOS: true
cgroupRoot: $CGROOT
enforceNodeAllocatable: []
failSwapOn: false
serializeImagePulls: false
# images are imported by hand (no registry): never garbage-collect them
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%"}
clusterDNS: ["$NODE_IP"]
clusterDomain: cluster.local
resolvConf: $ROOT/etc/resolv.conf
maxPods: 110
YAML
start kubelet "$K8S_BIN/kubelet" --config="$ROOT/etc/kubelet-config.yaml" \
  --kubeconfig="$ROOT/etc/kubelet.kubeconfig" --container-runtime=remote \
  --container-runtime-endpoint="unix://$C/containerd.sock" --runtime-request-timeout=10m \
  --root-dir="$ROOT/kubelet" --cert-dir="$ROOT/kubelet/pki" --hostname-override="$NODE_NAME" \
  --node-ip="$NODE_IP" --pod-infra-container-image="$PAUSE_IMAGE" --v=1
start kube-proxy "$K8S_BIN/kube-proxy" --kubeconfig="$ROOT/etc/proxy.kubeconfig" \
  --hostname-override="$NODE_NAME" --cluster-cidr="$FL_CLUSTER_POD_CIDR" --proxy-mode=iptables \
  --metrics-bind-address=127.0.0.1:10249 --healthz-bind-address=127.0.0.1:10256 \
  --conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0 --conntrack-tcp-timeout-close-wait=0

# ---------------------------------------------------------------------------------------------------------
# 7. cluster DNS stand-in
start dnsmasq dnsmasq --keep-in-foreground --no-resolv --no-hosts --no-poll --user=root \
  --listen-address="$NODE_IP" --bind-interfaces --port=53 --local=/cluster.local/ \
  --hostsdir="$ROOT/dns/hosts" --pid-file="$ROOT/run/dnsmasq.pid" --log-facility=-
start dns-sync "$LC_DIR/dns-sync.sh" "$KUBECTL" "$ROOT/admin.kubeconfig" "$ROOT/dns/hosts" "$ROOT/run/dnsmasq.pid" 1

# ---------------------------------------------------------------------------------------------------------
# 8. wait: node Ready, the default service account, a pod that runs
node_ready() { [ "$(K get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]; }
wait_for "node $NODE_NAME Ready" 120 node_ready
wait_for "serviceaccount default/default" 60 K -n default get serviceaccount default
wait_for "kubernetes service in DNS" 30 grep -q ' kubernetes.default.svc.cluster.local$' "$ROOT/dns/hosts/svc"
K apply -f - >/dev/null <<POD
apiVersion: v1
kind: Pod
metadata: {name: fl-cluster-check, namespace: kube-system}
spec:
  terminationGracePeriodSeconds: 0
  containers: [{name: pause, image: "$PAUSE_IMAGE", imagePullPolicy: Never}]
POD
pod_running() { [ "$(K -n kube-system get pod fl-cluster-check -o jsonpath='{.status.containerStatuses[0].ready}')" = true ]; }
wait_for "test pod kube-system/fl-cluster-check running" 120 pod_running
K -n kube-system delete pod fl-cluster-check --wait=false >/dev/null

log "cluster up in $((SECONDS - T_START)) s ($((SECONDS - T0)) s with builds); kubeconfig: $ROOT/admin.kubeconfig (kubectl: $KUBECTL)"
echo "$ROOT/admin.kubeconfig"
