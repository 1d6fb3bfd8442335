#!/usr/bin/env bash
# lab.sh - tcpipstat's kernel lab: compile SystemTap scripts for a Debian kernel and
# run them for real in a throwaway QEMU guest. Everything (stap, kernel, qemu) comes
# from a debootstrapped root under $LAB; QEMU uses TCG (nested KVM is unusable here).
#
#   lab.sh setup                                  # once; idempotent
#   lab.sh compile SCRIPT.stp [stap args...]      # -> ./NAME.ko (NAME from script, or -m NAME)
#   lab.sh run MODULE.ko [--] [modargs...] [--workload 'sh cmd in guest']   # MODULE.ko "-": untraced
#   lab.sh kver                                   # the lab kernel's release
#   lab.sh stap ARGS...      # stand-in for `stap` (TCPIPSTAT_STAP): runs in the root, .ko back in cwd
#   lab.sh staprun [-c CMD] MODULE.ko [modargs]   # stand-in for `staprun` (TCPIPSTAT_STAPRUN): in the guest
#   lab.sh bpftrace [-q] PROGRAM.bt [args] [-c CMD]  # stand-in for `bpftrace` (TCPIPSTAT_BPFTRACE):
#                            # in the guest (the kernel's BTF; kprobes, unlike this host's kernel);
#                            # also -l[v] PATTERN and --dry-run|-d -e PROGRAM there;
#                            # --version, and --info's OS line (the guest's kernel)
#
# run: module output -> stdout; /proc/net/snmp, netstat, snmp6 snapshots before/after,
# staprun/workload messages -> stderr; exit = staprun rc, else workload rc,
# 125 if the guest never reported. LAB_META_OUT=FILE: the guest meta (snapshots,
# @@ lines) goes there instead of stderr; the stand-ins also write the snapshots after the
# collector's output, as comment lines for tcpipstat (tcpipstat/reconcile.py), after the
# guest's cgroup ids and named network namespaces (tcpipstat/attribution.py).
# Env: LAB_DIR (default: ~/.cache/tcpipstat-lab),
# LAB_SUITE=bookworm|trixie, LAB_GUEST_TIMEOUT (s, default 300), LAB_SMP, LAB_MEM, LAB_KEEP=1,
# LAB_BACKGROUND='sh cmd' (started in the guest before the module: a process that is
# not the workload's, e.g. a server outside a -c command's process tree), LAB_BEFORE='sh cmd'
# (run in the guest to its end before the collector starts, e.g. insmod of a module it probes).
set -euo pipefail
LAB=${LAB_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tcpipstat-lab}; mkdir -p "$LAB"
SUITE=${LAB_SUITE:-bookworm}        # bookworm: stap 4.8 + kernel 6.1; trixie: stap 5.1 + kernel 6.12
ROOT=$LAB/$SUITE                    # debootstrapped root: stap, kernel, qemu, guest binaries
APT=(apt-get -y -q -o DPkg::Lock::Timeout=900 --no-install-recommends)
GUEST_BINS="/bin/busybox /usr/bin/staprun /usr/lib/systemtap/stapio /usr/bin/iperf3 /usr/local/bin/tcpwork /usr/bin/ss /usr/sbin/tc"
# loaded by the guest's /init: `ss -ti` (the independent view of cwnd, srtt, retransmissions)
# needs inet_diag/tcp_diag; `tc qdisc ... netem` (delay, loss) needs sch_netem
GUEST_MODULES="net/ipv4/inet_diag net/ipv4/tcp_diag net/sched/sch_netem"
HERE=$(cd "$(dirname "$0")" && pwd)

# run a command chrooted in $ROOT with private /proc and /dev mounts (vanish on exit)
in_root() {
  unshare -m --propagation private sh -c \
    'mount -t proc proc "$0/proc" && mount --bind /dev "$0/dev" && exec chroot "$0" "$@"' "$ROOT" "$@"
}
kver() { cat "$ROOT/.lab-kver"; }

setup() {
  export DEBIAN_FRONTEND=noninteractive
  "${APT[@]}" install debootstrap cpio
  if [ ! -e "$ROOT/.lab-debootstrap-ok" ]; then
    grep -q " $ROOT/" /proc/mounts && { echo "refusing: mounts under $ROOT" >&2; exit 1; }
    rm -rf "$ROOT"
    debootstrap --variant=minbase "$SUITE" "$ROOT" http://deb.debian.org/debian
    touch "$ROOT/.lab-debootstrap-ok"
  fi
  in_root apt-get -q update
  # headers + -dbg (vmlinux with DWARF) + image of the suite's current cloud kernel
  in_root env DEBIAN_FRONTEND=noninteractive "${APT[@]}" install systemtap bpftrace iperf3 iproute2 busybox-static libc6-dev gcc \
    qemu-system-x86 linux-headers-cloud-amd64 linux-image-cloud-amd64 linux-image-cloud-amd64-dbg
  local v; v=$(ls "$ROOT"/usr/lib/debug/boot/ | sed -n 's/^vmlinux-//p' | sort -V | tail -1)
  [ -d "$ROOT/usr/src/linux-headers-$v" ] && [ -f "$ROOT/boot/vmlinuz-$v" ] || { echo "no headers/image for $v" >&2; exit 1; }
  echo "$v" > "$ROOT/.lab-kver"
  local st=$ROOT/usr/share/systemtap     # minimal source fixes, see NOTES.md; idempotent
  case $SUITE in
    bookworm)  # stap 4.8: Debian 6.1.1xx backported task_work_cancel_func; kretprobe_instance lost ->rp in 5.11
      sed -i 's/\btask_work_cancel\b/task_work_cancel_func/g' "$st/runtime/stp_task_work.c"
      sed -i 's/pi->rp->data_size/get_kretprobe(pi)->data_size/' "$st/tapset/linux/kretprobe.stp"
      cp "$ROOT/usr/lib/debug/boot/System.map-$v" "$ROOT/boot/" ;;  # /boot one is a stub
    trixie)    # stap 5.1: 6.12 split uprobe_unregister into _nosync/_sync; make the lookup non-fatal
      sed -i '/resolve uprobe_unregister!/{s/_stp_error(.*);/;/;n;s/goto err0;/;/}' "$st/runtime/transport/transport.c" ;;
  esac
  rm -rf "$ROOT/root/.systemtap/cache"  # don't reuse modules built before the fixes
  rm -rf "$LAB/bt-list-$SUITE"          # (bpftrace -l answers of the kernel set up before)
  # the lab's own workload with known counts (lab/workload/tcpwork.c), static for the guest
  mkdir -p "$ROOT/usr/local/src" && cp "$HERE/workload/tcpwork.c" "$ROOT/usr/local/src/"
  in_root gcc -O2 -Wall -static -o /usr/local/bin/tcpwork /usr/local/src/tcpwork.c
  # pathwork (lab/workload/pathwork.c): not in the base initramfs; a run that wants it passes
  # it in its own overlay (LAB_EXTRA_FILES=$ROOT/usr/local/bin/pathwork: /pathwork in the guest)
  cp "$HERE/workload/pathwork.c" "$ROOT/usr/local/src/"
  in_root gcc -O2 -Wall -static -o /usr/local/bin/pathwork.new /usr/local/src/pathwork.c
  mv "$ROOT/usr/local/bin/pathwork.new" "$ROOT/usr/local/bin/pathwork"
  # base initramfs: static busybox, staprun/stapio/iperf3 + their shared libraries
  local g="$LAB/guest-$SUITE"; rm -rf "$g"; mkdir -p "$g"/{proc,sys,dev,tmp}
  for f in $GUEST_BINS $(in_root ldd $GUEST_BINS 2>/dev/null | grep -o '/[^ ]*\.so[^ ]*' | sort -u); do
    mkdir -p "$g$(dirname "$f")"; cp -L "$ROOT$f" "$g$f"
  done
  mkdir -p "$g/lib/lab-modules"     # busybox insmod takes plain .ko: trixie's are .ko.xz
  local m k; for m in $GUEST_MODULES; do
    k=$(ls "$ROOT/lib/modules/$v/kernel/$m".ko* | head -1)
    python3 -c 'import lzma, sys; d = open(sys.argv[1], "rb").read()
open(sys.argv[2], "wb").write(lzma.decompress(d) if sys.argv[1].endswith(".xz") else d)' "$k" "$g/lib/lab-modules/$(basename "$m").ko"
  done
  cat > "$g/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/usr/sbin:/usr/local/bin TERM=dumb
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in inet_diag tcp_diag sch_netem; do insmod /lib/lab-modules/$m.ko || echo "lab: insmod $m failed"; done
mount -t debugfs debugfs /sys/kernel/debug; mount -t tracefs nodev /sys/kernel/tracing
mount -t tmpfs tmp /tmp
ip link set lo up
stty -F /dev/ttyS1 raw -echo; stty -F /dev/ttyS2 raw -echo
sh /run.sh >/dev/ttyS2 2>&1
poweroff -f
EOF
  chmod +x "$g/init"
  (cd "$g" && find . | cpio -o -H newc --quiet | gzip -1) > "$LAB/guest-$SUITE.cpio.gz"
  # bpftrace and its libraries (LLVM: ~200 MB) in an archive of their own, added to the guest's
  # initramfs for bpftrace runs only: module runs stay as small and quick to boot as they were
  local b="$LAB/guest-bt-$SUITE"; rm -rf "$b"
  for f in /usr/bin/bpftrace $(in_root ldd /usr/bin/bpftrace 2>/dev/null | grep -o '/[^ ]*\.so[^ ]*' | sort -u); do
    [ -e "$g$f" ] && continue; mkdir -p "$b$(dirname "$f")"; cp -L "$ROOT$f" "$b$f"
  done
  (cd "$b" && find . | cpio -o -H newc --quiet | gzip -1) > "$LAB/guest-bt-$SUITE.cpio.gz"
  echo "setup done: suite=$SUITE kernel=$(kver) stap=$(in_root dpkg-query -W -f='${Version}' systemtap)" \
    "bpftrace=$(in_root dpkg-query -W -f='${Version}' bpftrace)"
}

compile() {
  local script=$1; shift
  local name; name=$(basename "$script" .stp | tr -c 'a-zA-Z0-9_\n' _)
  local w; w=$(mktemp -d "$ROOT/tmp/compile.XXXX"); trap "rm -rf '$w'" EXIT
  cp "$script" "$w/"
  local m=(); [[ " $* " == *" -m "* ]] || m=(-m "$name")
  in_root sh -c 'cd "$1" && k=$2 && shift 2 && exec stap -p4 -r "$k" "$@"' sh "${w#"$ROOT"}" "$(kver)" \
    "${m[@]}" "$(basename "$script")" "$@" > "$w/stdout"
  local ko; ko=$(tail -1 "$w/stdout")
  cp "$w/$ko" . && echo "$PWD/$ko"
}

run() {
  local ko=$1; shift; [ "$ko" = - ] || [ -f "$ko" ] || { echo "no such module: $ko" >&2; exit 2; }
  local args=() workload=""
  while [ $# -gt 0 ]; do
    case $1 in --) ;; --workload) workload=$2; shift ;; *) args+=("$1") ;; esac; shift
  done
  local r; r=$(mktemp -d "$ROOT/tmp/run.XXXX"); mkdir "$r/ov"; local q=${r#"$ROOT"}  # q: path seen in root
  if [ -n "${LAB_KEEP:-}" ]; then echo "run dir: $r" >&2; else trap "rm -rf '$r'" EXIT; fi
  [ "$ko" = - ] || cp "$ko" "$r/ov/"
  local cflag=""
  if [ -n "$workload" ]; then
    printf '#!/bin/sh\nexec >/dev/ttyS2 2>&1\n( %s )\necho "@@WORKLOAD_RC=$?"\n' "$workload" > "$r/ov/workload.sh"
    chmod +x "$r/ov/workload.sh"; cflag="-c /workload.sh"
    [[ $ko != *.bt ]] || cflag="-c '/bin/sh /workload.sh'"    # (bpftrace runs ELF files only)
  fi
  cat > "$r/ov/run.sh" <<EOF
# /proc/net/snmp6 has one "Name value" a line: its Ip6 lines become a header/values pair like snmp's
snap() { echo "@@SNMP_\$1"; grep -E '^(Ip|Tcp):' /proc/net/snmp; grep '^TcpExt:' /proc/net/netstat
  [ ! -r /proc/net/snmp6 ] || awk '/^Ip6/ {h=h" "\$1; v=v" "\$2} END {print "Ip6:" h; print "Ip6:" v}' /proc/net/snmp6; }
# where sockets belong, named in the guest: its cgroup v2 ids (a folder's inode) with their
# paths, and its named network namespaces' inodes (nsfs files in /run/netns), for tcpipstat
places() { m=\$(awk '\$3 == "cgroup2" {print \$2; exit}' /proc/mounts)
  if [ -n "\$m" ]; then echo "@@CGROUP2 \$m"
    find "\$m" -type d | while read -r d; do p=\${d#"\$m"}; echo "@@CGROUP \$(stat -c %i "\$d") \${p:-/}"; done
  fi
  nsfs=\$(stat -L -c %d /proc/self/ns/net)
  for f in /run/netns/*; do
    [ "\$(stat -c %d "\$f" 2>/dev/null)" != "\$nsfs" ] || echo "@@NETNS \$(stat -c %i "\$f") \${f##*/}"
  done; }
$(if [ -n "${LAB_BEFORE:-}" ]; then printf '( %s ) >/dev/ttyS2 2>&1\n' "$LAB_BEFORE"; fi)
snap BEFORE
$(if [ -n "${LAB_BACKGROUND:-}" ]; then printf '( %s ) >/dev/ttyS2 2>&1 &\n' "$LAB_BACKGROUND"; fi)
$(if [ -n "${LAB_BT_LIST:-}" ]; then echo "bpftrace $LAB_BT_LIST >/dev/ttyS1"
  elif [ "$ko" = - ]; then echo "timeout -s INT ${LAB_GUEST_TIMEOUT:-300} /workload.sh >/dev/ttyS1  # untraced"
  elif [[ $ko == *.bt ]]; then
    echo "export BPFTRACE_MAP_KEYS_MAX=${BPFTRACE_MAP_KEYS_MAX:-4096} BPFTRACE_MAX_MAP_KEYS=${BPFTRACE_MAX_MAP_KEYS:-4096}"
    echo "timeout -s INT ${LAB_GUEST_TIMEOUT:-300} bpftrace ${LAB_BT_FLAGS:-} /$(basename "$ko") ${args[*]+$(printf '%q ' "${args[@]}")} $cflag >/dev/ttyS1"
  else echo "timeout -s INT ${LAB_GUEST_TIMEOUT:-300} staprun $cflag /$(basename "$ko") ${args[*]+$(printf '%q ' "${args[@]}")} >/dev/ttyS1"; fi)
echo "@@STAPRUN_RC=\$?"
places
# what the module allocated, as its init logged it ("systemtap: V, base: .., memory: ..")
dmesg | grep -m1 -o 'systemtap: .*memory: .*' | sed 's/^/@@STAP_MEM /'
snap AFTER
EOF
  local base=("$LAB/guest-$SUITE.cpio.gz")
  [[ $ko != *.bt ]] && [ -z "${LAB_BT_LIST:-}" ] || base+=("$LAB/guest-bt-$SUITE.cpio.gz")
  for a in ${LAB_EXTRA_FILES:-}; do cp "$a" "$r/ov/"; done     # (files the workload reads)
  (cd "$r/ov" && find . | cpio -o -H newc --quiet | gzip -1) | cat "${base[@]}" - > "$r/initrd"
  local try
  for try in 1 2 3; do  # retry only guests that died before /init ran (TCG early-boot flakes)
    in_root timeout $(( ${LAB_GUEST_TIMEOUT:-300} + 120 )) qemu-system-x86_64 -accel tcg \
      -smp "${LAB_SMP:-2}" -m "${LAB_MEM:-1024}" -nodefaults -no-user-config -display none -no-reboot \
      -kernel "/boot/vmlinuz-$(kver)" -initrd "$q/initrd" -append 'console=ttyS0 quiet panic=-1' \
      -serial "file:$q/console.log" -serial "file:$q/stdout" -serial "file:$q/meta" || true
    [ -s "$r/meta" ] && break
    echo "lab.sh: guest died before /init ran (try $try): $(grep -m1 -i panic "$r/console.log" || true)" >&2
  done
  touch "$r/stdout" "$r/meta" "$r/console.log"; cat "$r/stdout"
  if [ -n "${LAB_SNAPSHOT_LINES:-}" ]; then  # the guest's places (attribution.py), counters (reconcile.py)
    awk '/^@@CGROUP2 / {print "# tcpipstat-place cgroup2 " substr($0, 11); next}
         /^@@CGROUP / {print "# tcpipstat-place cgroup " substr($0, 10); next}
         /^@@NETNS / {print "# tcpipstat-place netns " substr($0, 9)}' "$r/meta"
    awk '/^@@SNMP_/ {print "# tcpipstat-snapshot " substr($1,8); next}
         /^(Ip|Tcp|TcpExt|Ip6): / {print "# " $0}' "$r/meta"
  fi
  local meta=/dev/stderr
  if [ -n "${LAB_META_OUT:-}" ]; then  # meta to the file; staprun's and the workload's own lines to stderr
    meta=$LAB_META_OUT; grep -v -E '^$|^@@|^(Ip|Tcp|TcpExt|Ip6): ' "$r/meta" >&2 || true
  fi
  grep -v '^$' "$r/meta" >> "$meta" || true
  awk '/^@@SNMP_/ {s=substr($1,8); next}                     # oracle: non-zero counter deltas
       /^[A-Za-z][A-Za-z0-9]*: [A-Za-z]/ {h[$1]=$0; next} /^[A-Za-z][A-Za-z0-9]*: -?[0-9]/ {v[s,$1]=$0}
       END {for (p in h) {n=split(h[p],H," "); split(v["BEFORE",p],B," "); split(v["AFTER",p],A," "); o=""
            for (i=2; i<=n; i++) if (A[i]-B[i]) o=o" "H[i]"="A[i]-B[i]; if (o) print "@@SNMP_DELTA " p o}}' "$r/meta" >> "$meta"
  local rc wrc
  rc=$(sed -n 's/^@@STAPRUN_RC=//p' "$r/meta"); wrc=$(sed -n 's/^@@WORKLOAD_RC=//p' "$r/meta")
  if [ -z "$rc" ]; then echo "guest did not report; console log:" >&2; tail -40 "$r/console.log" >&2; rc=125; fi
  [ "$rc" = 0 ] && [ -z "${LAB_STAPRUN_RC_ONLY:-}" ] && rc=${wrc:-0}
  return "$rc"
}

# stand-in for `stap` as tcpipstat calls it (cwd holds the script; -m NAME -> NAME.ko back in cwd)
stap_cmd() {
  local w; w=$(mktemp -d "$ROOT/tmp/stap.XXXX"); trap "rm -rf '$w'" EXIT
  local a; for a in "$@"; do case $a in *.stp) [ -f "$a" ] && cp "$a" "$w/" ;; esac; done
  local rc=0
  in_root sh -c 'cd "$1" && shift && exec stap "$@"' sh "${w#"$ROOT"}" "$@" || rc=$?
  for a in "$w"/*.ko; do [ -f "$a" ] && cp "$a" .; done
  return $rc
}

# stand-in for `staprun [-c CMD] MODULE.ko [modargs]`: the module runs in the guest
staprun_cmd() {
  local workload=""
  while [ $# -gt 0 ]; do
    case $1 in -c) workload=$2; shift 2 ;; -*) echo "lab.sh staprun: unsupported option $1" >&2; exit 2 ;; *) break ;; esac
  done
  [ $# -ge 1 ] || { echo "usage: $0 staprun [-c CMD] MODULE.ko [modargs]" >&2; exit 2; }
  local ko=$1; shift
  export LAB_STAPRUN_RC_ONLY=1 LAB_SNAPSHOT_LINES=1   # like staprun: its own status
  if [ -n "$workload" ]; then run "$ko" -- "$@" --workload "$workload"; else run "$ko" -- "$@"; fi
}

# stand-in for `bpftrace [-q] PROGRAM.bt [args] [-c CMD]` as tcpipstat calls it: the program
# runs in the guest. CMD "/bin/sh FILE" (how tcpipstat passes -c) runs FILE, copied in.
bpftrace_cmd() {
  case ${1:-} in
    -l|-lv) bpftrace_list "$@"; return ;;
    --dry-run|-d) bpftrace_dry "$@"; return ;;
    --version|-V) in_root bpftrace --version; return ;;   # (the guest runs the root's bpftrace)
    # (tcpipstat reads only the kernel's release, the guest's: the root's bpftrace would
    # describe the host's kernel)
    --info) printf 'System\n  OS: Linux %s (the lab guest)\n' "$(kver)"; return ;;
  esac
  local prog="" workload="" args=() flags=()
  while [ $# -gt 0 ]; do
    case $1 in
      -c) workload=$2; shift 2 ;;
      -q) flags+=(-q); shift ;;
      -*) echo "lab.sh bpftrace: unsupported option $1" >&2; exit 2 ;;
      *) if [ -z "$prog" ]; then prog=$1; else args+=("$1"); fi; shift ;;
    esac
  done
  [ -n "$prog" ] || { echo "usage: $0 bpftrace [-q] PROGRAM.bt [args] [-c CMD]" >&2; exit 2; }
  local t rc=0; t=$(mktemp -d)     # (removed below: run's EXIT trap would replace one here)
  cp "$prog" "$t/tcpipstat.bt"
  if [[ $workload == "/bin/sh "* ]] && [ -f "${workload#/bin/sh }" ]; then
    cp "${workload#/bin/sh }" "$t/command.sh"   # (beside the files the caller passes in)
    export LAB_EXTRA_FILES="${LAB_EXTRA_FILES:+$LAB_EXTRA_FILES }$t/command.sh"
    workload="sh /command.sh"
  fi
  export LAB_STAPRUN_RC_ONLY=1 LAB_BT_FLAGS="${flags[*]-}" LAB_SNAPSHOT_LINES=1  # (as above)
  if [ -n "$workload" ]; then run "$t/tcpipstat.bt" -- "${args[@]}" --workload "$workload" || rc=$?
  else run "$t/tcpipstat.bt" -- "${args[@]}" || rc=$?; fi
  rm -rf "$t"; return "$rc"
}

# `bpftrace -l[v] PATTERN` in the guest. Its answer depends on the guest's kernel only: kept
# per suite until the next setup (a guest boot per listing costs ~10 s). A module's functions
# (kfunc:MODULE:...) are there only once the module is loaded: such a listing runs after
# LAB_BEFORE (which loads it, from LAB_EXTRA_FILES) and is kept per LAB_BEFORE too.
bpftrace_list() {
  [ $# -eq 2 ] && [[ $2 =~ ^[A-Za-z0-9_:*\ ]+$ ]] || { echo "usage: $0 bpftrace -l[v] PATTERN" >&2; exit 2; }
  local c="$LAB/bt-list-$SUITE/$1-${2//[:* ]/_}" before=""
  if [[ $2 =~ ^kfunc:[A-Za-z0-9_]+: ]] && [ -n "${LAB_BEFORE:-}" ]; then
    before=$LAB_BEFORE; c="$c-$(printf '%s' "$before" | md5sum | cut -c1-12)"
  fi
  if [ ! -s "$c" ]; then
    mkdir -p "$(dirname "$c")"
    LAB_BEFORE=$before LAB_BT_LIST="$1 '$2'" LAB_STAPRUN_RC_ONLY=1 LAB_META_OUT=/dev/null run - > "$c.tmp" && mv "$c.tmp" "$c"
  fi
  cat "$c"
}

# `bpftrace --dry-run|-d -e PROGRAM` in the guest: does PROGRAM compile against the guest
# kernel's BTF (tcpipstat asks whether it can read a socket's cgroup)? Its status, kept per
# suite and program like the listings.
bpftrace_dry() {
  local ok='^[A-Za-z0-9_:*{}()$@=;>.,/ -]+$'
  [ $# -eq 3 ] && [ "$2" = -e ] && [[ $3 =~ $ok ]] || { echo "usage: $0 bpftrace --dry-run|-d -e PROGRAM" >&2; exit 2; }
  local c rc=0; c="$LAB/bt-list-$SUITE/dry$1-$(printf %s "$3" | md5sum | cut -c1-16)"
  if [ ! -s "$c" ]; then
    mkdir -p "$(dirname "$c")"
    LAB_BT_LIST="$1 -e '$3'" LAB_STAPRUN_RC_ONLY=1 LAB_META_OUT=/dev/null run - >/dev/null || rc=$?
    [ "$rc" != 125 ] || return 125      # (the guest never reported: no answer to keep)
    echo "$rc" > "$c"
  fi
  return "$(cat "$c")"
}

cmd=${1:-}; shift || true
case $cmd in
  setup) setup ;;
  compile) [ $# -ge 1 ] || { echo "usage: $0 compile SCRIPT.stp [stap args]" >&2; exit 2; }; compile "$@" ;;
  run) [ $# -ge 1 ] || { echo "usage: $0 run MODULE.ko [--] [modargs] [--workload CMD]" >&2; exit 2; }; run "$@" ;;
  kver) kver ;;
  stap) stap_cmd "$@" ;;
  staprun) staprun_cmd "$@" ;;
  bpftrace) bpftrace_cmd "$@" ;;
  *) sed -n '2,18p' "$0"; exit 2 ;;
esac
