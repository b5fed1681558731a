#!/usr/bin/env bash
# Starts (or stops) hpo workers over ssh on a list of hosts. Each host runs one `hpo worker`
# (a supervisor of several with --jobs/--gpus), detached from the ssh session (setsid + nohup),
# appending to LOG_DIR/HOST.log on that host and keeping its pid in LOG_DIR/HOST.pid there, so
# that `stop` finds it from any machine.
# The scripts sent to the hosts are written with '$variables' that expand there, not here:
# shellcheck disable=SC2016
set -euo pipefail

usage() {
    cat <<'EOF'
usage: ssh_workers.sh start --study NAME [options] [HOST...] [-- WORKER-ARGS...]
       ssh_workers.sh stop [options] [HOST...]

Hosts come as arguments (user@host works) and/or one per line in --hosts FILE, where a host may be
followed by its own worker options, e.g. "gpu-node1 --gpus all" or "cpu-node2 --jobs 16"; a host
without --jobs/--gpus gets the ones given here (default: one worker). Lines starting with # are skipped.

  --study NAME        the study, created beforehand with `hpo create`
  --storage URL       storage URL; better: export HPO_STORAGE=URL, which keeps it out of this
                      machine's process list. It reaches the hosts on ssh's stdin, never in a
                      command line, and is printed only with its password replaced by ***
  --hosts FILE        hosts file (see above)
  --jobs N            N CPU workers per host
  --gpus LIST         one worker per GPU per host: 0,1,2 or all
  --per-gpu K         K workers per GPU, with --gpus
  --venv DIR          remote virtualenv to activate (DIR/bin/activate)
  --activate CMD      remote shell command run before hpo, e.g. "module load cuda; . ~/env/bin/activate"
  --workdir DIR       remote working directory (default: the login directory)
  --log-dir DIR       remote directory of HOST.log and HOST.pid (default: hpo-logs, under --workdir);
                      HOST is the name as listed, with characters other than A-Za-z0-9._- as _
  --index-stride S    host k (from 0, in list order) numbers its workers from k*S with
                      --worker-index, so that sampler seeds differ across hosts (default 100)
  --ssh-opts "OPTS"   extra ssh options, also from $HPO_SSH_OPTS, e.g. "-i key -p 2222"
  --wait SECONDS      stop: how long the workers get to checkpoint and hand back their trials
                      after SIGTERM before they are killed (default 60)
  WORKER-ARGS         after --, passed on to every `hpo worker`, e.g. -- --threads 4
EOF
}

die() { echo "ssh_workers.sh: $*" >&2; exit 2; }

# user:password@ in the URL, and password= in its query, become ***.
redact() { sed -E -e 's#(://[^/:@]*:)[^/@]*@#\1***@#' -e 's#([?&]password=)[^&]*#\1***#g'; }

[ $# -ge 1 ] || { usage >&2; exit 2; }
action=$1
shift
case "$action" in
    start | stop) ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
esac

study="" hosts_file="" venv="" activate="" workdir="" log_dir="hpo-logs" stride=100 wait_s=60
storage=${HPO_STORAGE:-}
read -ra ssh_opts <<<"${HPO_SSH_OPTS:-}"
slot_args=()  # --jobs/--gpus/--per-gpu for hosts that give none
worker_args=()
hosts=()
host_args=()  # per host: its own options from the hosts file, as one string
while [ $# -gt 0 ]; do
    case "$1" in
        --study) study=${2:?}; shift 2 ;;
        --storage) storage=${2:?}; shift 2 ;;
        --hosts) hosts_file=${2:?}; shift 2 ;;
        --jobs | --gpus | --per-gpu) slot_args+=("$1" "${2:?}"); shift 2 ;;
        --venv) venv=${2:?}; shift 2 ;;
        --activate) activate=${2:?}; shift 2 ;;
        --workdir) workdir=${2:?}; shift 2 ;;
        --log-dir) log_dir=${2:?}; shift 2 ;;
        --index-stride) stride=${2:?}; shift 2 ;;
        --ssh-opts) read -ra more <<<"${2:?}"; ssh_opts+=("${more[@]}"); shift 2 ;;
        --wait) wait_s=${2:?}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; worker_args=("$@"); break ;;
        -*) die "unknown option $1" ;;
        *) hosts+=("$1"); host_args+=(""); shift ;;
    esac
done
if [ -n "$hosts_file" ]; then
    while read -r host rest || [ -n "$host" ]; do
        case "$host" in "" | "#"*) continue ;; esac
        hosts+=("$host")
        host_args+=("$rest")
    done <"$hosts_file"
fi
[ ${#hosts[@]} -gt 0 ] || die "no hosts (give them as arguments or with --hosts FILE)"

# Every host's files are named after it; on a shared file system two entries for one host would clash.
names=()
for host in "${hosts[@]}"; do
    name=${host//[^A-Za-z0-9._-]/_}
    for seen in "${names[@]+"${names[@]}"}"; do
        [ "$seen" != "$name" ] || die "host $host is listed twice"
    done
    names+=("$name")
done

# The remote side: bash reading a script from ssh's stdin, its values quoted with printf %q.
# No `set -u` there: activate scripts and `module` often read unset variables.
prelude() {
    echo "set -eo pipefail"
    [ -z "$workdir" ] || printf 'cd %q\n' "$workdir"
    printf 'mkdir -p %q\n' "$log_dir"
    printf 'log_dir=$(cd %q && pwd)\n' "$log_dir"
}

remote_start() {  # name index worker-args...
    local name=$1 index=$2
    shift 2
    prelude
    [ -z "$venv" ] || printf '. %q/bin/activate\n' "$venv"
    [ -z "$activate" ] || printf '%s\n' "$activate"
    printf 'export HPO_STORAGE=%q\n' "$storage"
    printf 'log="$log_dir"/%q.log\n' "$name"
    printf 'pidfile="$log_dir"/%q.pid\n' "$name"
    # setsid: the worker leads a process group of its own (its supervised workers included), out of
    # reach of the ssh session's end, and `stop` can wait for the whole group.
    printf 'setsid nohup hpo worker --study %q --worker-index %q' "$study" "$index"
    [ $# -eq 0 ] || printf ' %q' "$@"
    printf ' >>"$log" 2>&1 </dev/null &\n'
    cat <<'EOF'
pid=$!
echo "$pid" >"$pidfile"
# A worker that cannot start (no hpo on PATH, a bad option) is gone within seconds: say so here.
for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
if ! kill -0 "$pid" 2>/dev/null; then
    code=0
    wait "$pid" || code=$?
    if [ "$code" -ne 0 ]; then echo "worker exited at once with $code; $log ends with:"; tail -n 5 "$log"; exit 1; fi
fi
echo "pid $pid, log $log"
EOF
}

remote_stop() {  # name
    local name=$1
    prelude
    printf 'pidfile="$log_dir"/%q.pid\n' "$name"
    printf 'wait_s=%q\n' "$wait_s"
    cat <<'EOF'
if [ ! -f "$pidfile" ]; then echo "no worker started here"; exit 0; fi
pid=$(cat "$pidfile")
alive() { kill -0 -- "-$pid" 2>/dev/null; }
# A pid file outlives its worker, and the pid may belong to another program since: only signal
# the group if its leader still runs hpo, or if an orphaned child of it is still in the group.
if ! alive; then echo "pid $pid: already exited"; rm -f "$pidfile"; exit 0; fi
case "$(ps -o args= -p "$pid" 2>/dev/null || true)" in
    *hpo*worker* | "") ;;
    *) echo "pid $pid is no longer an hpo worker; left alone"; rm -f "$pidfile"; exit 0 ;;
esac
# SIGTERM to the leader only: a supervisor forwards it to its workers, and a worker that got it
# twice could be interrupted while handing its trial back.
kill -TERM "$pid" 2>/dev/null || kill -TERM -- "-$pid" 2>/dev/null || true
for _ in $(seq "$wait_s"); do alive || break; sleep 1; done
if alive; then kill -KILL -- "-$pid" 2>/dev/null || true; echo "pid $pid: killed after ${wait_s}s"
else echo "pid $pid: stopped"; fi
rm -f "$pidfile"
EOF
}

run_on() {  # host script: runs the script with bash on the host, its output prefixed with the host
    local host=$1 script=$2
    # BatchMode: fail rather than wait for a password prompt nobody answers.
    ssh "${ssh_opts[@]+"${ssh_opts[@]}"}" -o BatchMode=yes "$host" bash -s <<<"$script" 2>&1 | sed "s#^#$host: #"
}

if [ "$action" = start ]; then
    [ -n "$study" ] || die "--study is required"
    [ -n "$storage" ] || die "no storage: give --storage URL or export HPO_STORAGE"
    echo "starting workers on ${#hosts[@]} hosts for study $study on $(redact <<<"$storage")"
fi
# All hosts at once: each ssh in the background, its output lines prefixed with its host.
jobs_=()
for i in "${!hosts[@]}"; do
    if [ "$action" = start ]; then
        read -ra own <<<"${host_args[$i]}"
        case " ${host_args[$i]} " in
            *" --jobs "* | *" --gpus "* | *" -j "*) args=() ;;
            *) args=("${slot_args[@]+"${slot_args[@]}"}") ;;
        esac
        args+=("${own[@]+"${own[@]}"}" "${worker_args[@]+"${worker_args[@]}"}")
        script=$(remote_start "${names[$i]}" $((i * stride)) "${args[@]+"${args[@]}"}")
    else
        script=$(remote_stop "${names[$i]}")
    fi
    run_on "${hosts[$i]}" "$script" &
    jobs_+=($!)
done
failed=0
for i in "${!jobs_[@]}"; do
    wait "${jobs_[$i]}" || { echo "${hosts[$i]}: failed" >&2; failed=$((failed + 1)); }
done
[ "$failed" -eq 0 ] || die "$failed of ${#hosts[@]} hosts failed"
