# pyvmm guest agent: busybox sh, sourced by /init on /dev/ttyS1 (stdin and
# stdout), or run as `sh agent.sh`.
#
# Protocol (one request at a time, lines end in "\n"):
#   agent -> host   @@PYVMM-AGENT READY <version> <uptime-seconds>
#   host  -> agent  @@REQ <id> <verb> [<args>]
#   agent -> host   @@BEGIN <id>
#                   <output bytes>
#                   "\n"@@END <id> <exit-status>
# The "\n" before @@END is always sent, so @@END always starts a line and the
# host gets the output back exactly by dropping that one newline. Lines that
# are not "@@REQ ..." are ignored.
#
# Under PVM every fork/exec costs 1-2 s of interpreted guest-kernel work and
# every system call about a millisecond, so this script uses shell builtins
# (read, printf, case, globbing, cd -P) and execs a program only where no
# builtin can do the job (stty once, poweroff/reboot) or where a builtin
# would be slower: ash's `read` makes one system call per byte, so files
# longer than a few lines are read by memtool (9 KiB, no libc) instead.

AGENT_VERSION=1
# Overridable so that the script can also be exercised on a build host.
AGENT_SHELL=${AGENT_SHELL:-/bin/sh}
AGENT_SCRIPT=${AGENT_SCRIPT:-$0}
MEMTOOL=${MEMTOOL:-/bin/memtool}
RUN_SCRIPT=${RUN_SCRIPT:-/tmp/.pyvmm-agent-run}
MEMORY_SYSFS=/sys/devices/system/memory
CR=$'\r'	# busybox ash's $'...': no fork

# A `run` command that calls `exit` (or an eval syntax error) ends this
# shell: close the open frame with its status, then start afresh.
_agent_on_exit() {
	_a_st=$?
	[ -n "$_a_id" ] && printf '\n@@END %s %s\n' "$_a_id" "$_a_st"
	exec "$AGENT_SHELL" "$AGENT_SCRIPT" restarted
}

# Raw: no echo of the host's bytes, no CR/LF translation, no signal chars.
[ "$1" = restarted ] || stty raw -echo

# ---- verbs: each writes its output to stdout and sets _a_st ----

_agent_run() {
	# The host escapes "\" as "\\", newline as "\n" and CR as "\r";
	# only then does the command need decoding (through a tmpfs file,
	# since command substitution would fork).
	case $_a_args in
	*\\*)
		printf '%b' "$_a_args" > "$RUN_SCRIPT"
		{ . "$RUN_SCRIPT"; } < /dev/null 2>&1
		;;
	*)
		{ eval "$_a_args"; } < /dev/null 2>&1
		;;
	esac
	_a_st=$?
}

_agent_meminfo() {
	"$MEMTOOL" cat /proc/meminfo 2>&1
	_a_st=$?
}

# "PATH: value" lines for block_size_bytes and each block's state and
# valid_zones. A builtin `read` of a sysfs file costs about 1/8 of an exec
# of memtool (measured), so few blocks are read here, many by memtool.
MEMBLOCKS_BUILTIN_MAX=8
_agent_memblocks() {
	set -- "$MEMORY_SYSFS"/memory[0-9]*
	if [ $# -gt "$MEMBLOCKS_BUILTIN_MAX" ]; then
		"$MEMTOOL" cat -l "$MEMORY_SYSFS/block_size_bytes" \
			"$MEMORY_SYSFS"/memory[0-9]*/state \
			"$MEMORY_SYSFS"/memory[0-9]*/valid_zones 2>&1
		_a_st=$?
		return
	fi
	_a_st=1
	read -r _a_bs < "$MEMORY_SYSFS/block_size_bytes" || return
	_a_out="$MEMORY_SYSFS/block_size_bytes: $_a_bs
"
	for _a_b in "$@"; do
		[ -d "$_a_b" ] || continue
		_a_state=? _a_zones=
		{ read -r _a_state < "$_a_b/state"; } 2>/dev/null
		{ read -r _a_zones < "$_a_b/valid_zones"; } 2>/dev/null
		_a_out="$_a_out$_a_b/state: $_a_state
$_a_b/valid_zones: $_a_zones
"
	done
	printf '%s' "$_a_out"
	_a_st=0
}

# _agent_driver DEVDIR: the name of the bound driver, or "-".
_agent_driver() {
	_a_drv=-
	if cd -P "$1/driver" 2>/dev/null; then
		_a_drv=${PWD##*/}
	fi
}

_agent_devices() {
	_a_pwd=$PWD
	_a_out=
	for _a_d in /sys/bus/virtio/devices/*; do
		[ -e "$_a_d" ] || continue
		_a_dev=? _a_ven=?
		{ read -r _a_dev < "$_a_d/device"; } 2>/dev/null
		{ read -r _a_ven < "$_a_d/vendor"; } 2>/dev/null
		_agent_driver "$_a_d"
		_a_out="${_a_out}virtio ${_a_d##*/} device=$_a_dev vendor=$_a_ven driver=$_a_drv
"
	done
	for _a_d in /sys/bus/vmbus/devices/*; do
		[ -e "$_a_d" ] || continue
		_a_cls=? _a_dev=?
		{ read -r _a_cls < "$_a_d/class_id"; } 2>/dev/null
		{ read -r _a_dev < "$_a_d/device_id"; } 2>/dev/null
		_agent_driver "$_a_d"
		_a_out="${_a_out}vmbus ${_a_d##*/} class_id=$_a_cls device_id=$_a_dev driver=$_a_drv
"
	done
	cd "$_a_pwd" || cd /
	printf '%s' "$_a_out"
	_a_st=0
}

_agent_dmesg() {
	_a_n=${_a_args:-50}
	case $_a_n in
	*[!0-9]*) printf 'bad line count: %s\n' "$_a_n"; _a_st=2; return ;;
	esac
	"$MEMTOOL" klog "$_a_n" 2>&1
	_a_st=$?
}

_agent_uptime() {
	read -r _a_up _a_idle < /proc/uptime
	printf '%s\n' "$_a_up"
	_a_st=0
}

# Word-split the arguments (no globbing) into $1.. for the pattern verbs.
_agent_pattern() {
	set -f
	# shellcheck disable=SC2086
	set -- $_a_args
	set +f
	case $_a_verb in
	pattern-fill)
		[ $# -eq 3 ] || { echo "usage: pattern-fill PATH SIZE SEED"; _a_st=2; return; }
		"$MEMTOOL" fill "$1" "$2" "$3" 2>&1
		;;
	pattern-verify)
		[ $# -eq 2 ] || { echo "usage: pattern-verify PATH SEED"; _a_st=2; return; }
		"$MEMTOOL" verify "$1" "$2" 2>&1
		;;
	pattern-free)
		[ $# -eq 1 ] || { echo "usage: pattern-free PATH"; _a_st=2; return; }
		rm -f -- "$1" 2>&1
		;;
	esac
	_a_st=$?
}

# ---- main loop ----

trap _agent_on_exit EXIT
# /init makes this process the target of the ACPI power button (SIGUSR2).
if [ -n "$AGENT_POWER_BUTTON" ]; then
	trap 'trap - EXIT; poweroff -f' USR2
fi
read -r _a_up _a_idle < /proc/uptime
printf '@@PYVMM-AGENT READY %s %s\n' "$AGENT_VERSION" "$_a_up"

while IFS= read -r _a_line; do
	_a_line=${_a_line%"$CR"}
	case $_a_line in
	"@@REQ "*) ;;
	*) continue ;;		# noise (e.g. bytes sent before stty): ignore
	esac
	_a_rest=${_a_line#@@REQ }
	_a_id=${_a_rest%% *}
	_a_rest=${_a_rest#"$_a_id"}
	_a_rest=${_a_rest# }
	_a_verb=${_a_rest%% *}
	_a_args=${_a_rest#"$_a_verb"}
	_a_args=${_a_args# }
	printf '@@BEGIN %s\n' "$_a_id"
	_a_st=0
	case $_a_verb in
	run) _agent_run ;;
	ping) echo pong ;;
	meminfo) _agent_meminfo ;;
	memblocks) _agent_memblocks ;;
	devices) _agent_devices ;;
	dmesg) _agent_dmesg ;;
	uptime) _agent_uptime ;;
	pattern-fill | pattern-verify | pattern-free) _agent_pattern ;;
	poweroff | reboot)
		printf '\n@@END %s 0\n' "$_a_id"
		_a_id=
		trap - EXIT
		"$_a_verb" -f
		exit 0
		;;
	*) printf 'unknown verb: %s\n' "$_a_verb"; _a_st=127 ;;
	esac
	printf '\n@@END %s %s\n' "$_a_id" "$_a_st"
	_a_id=
done

# stdin closed (hang-up): nothing left to serve.
trap - EXIT
