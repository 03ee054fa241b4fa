"""`densevse submit | status | logs | stop`: pipeline runs as Ray Jobs (pipeline/jobs.py)."""
from __future__ import annotations

import json

from densevse.pipeline.jobs import COMMANDS, _info, client, default_address, follow, submit
from densevse.pipeline.cli.args import common_args


def cmd_submit(args) -> int:
    """Submit a run to a Ray cluster (--address http://HEAD:8265), or run it here (--address local)."""
    if args.address == "local":  # the same verb, in this process
        from densevse.pipeline.cli import core

        args.quiet, args.resume, args.checkpoint = False, False, None
        return core.COMMANDS[args.command](args)
    job_id = submit(args.config, args.overrides, args.address, args.command, args.pip, args.python,
                    args.submission_id)
    print(f"submitted {job_id} to {args.address}\n  densevse status {job_id} --address {args.address}\n"
          f"  densevse logs {job_id} --follow --address {args.address}")
    if not args.wait:
        return 0
    status = follow(args.address, job_id)
    print(f"\n{job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_status(args) -> int:
    c = client(args.address)
    if args.job:
        print(json.dumps(_info(c.get_job_info(args.job)), indent=1, default=str))
    else:
        for j in sorted(c.list_jobs(), key=lambda j: j.start_time or 0):
            print(f"{j.submission_id or j.job_id}\t{j.status}\t{j.entrypoint}")
    return 0


def cmd_logs(args) -> int:
    if args.follow:
        return 0 if follow(args.address, args.job) == "SUCCEEDED" else 1
    print(client(args.address).get_job_logs(args.job), end="")
    return 0


def cmd_stop(args) -> int:
    stopped = client(args.address).stop_job(args.job)
    print(f"{args.job}: {'stop requested' if stopped else 'not running'}")
    return 0


def register(sub) -> None:
    addr = dict(default=default_address(), help="Ray dashboard URL, e.g. http://HEAD:8265 (default: %(default)s)")
    p = sub.add_parser("submit", help="submit a pipeline run as a Ray job", description=cmd_submit.__doc__)
    common_args(p)
    p.add_argument("--address", **{**addr, "help": addr["help"] + "; 'local' runs it in this process"})
    p.add_argument("--command", choices=COMMANDS, default="run", help="what the job runs (default: run)")
    p.add_argument("--pip", action="append", default=None, metavar="REQ",
                   help="extra pip requirement installed for this job on the nodes (repeatable)")
    p.add_argument("--python", default="python", help="the nodes' Python executable (default: python on PATH)")
    p.add_argument("--submission-id", default=None, help="job id (default: densevse-<command>-<run>-<time>-<rand>)")
    p.add_argument("--wait", action="store_true", help="follow the job's logs until it ends; exit 1 unless it succeeded")
    p.set_defaults(func=cmd_submit)

    for name, fn, help_ in [("status", cmd_status, "a job's status (no JOB: list jobs)"),
                            ("logs", cmd_logs, "a job's logs"), ("stop", cmd_stop, "stop a job")]:
        q = sub.add_parser(name, help=help_)
        q.add_argument("job", nargs="?" if name == "status" else None, help="the submission id")
        q.add_argument("--address", **addr)
        q.set_defaults(func=fn)
        if name == "logs":
            q.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
