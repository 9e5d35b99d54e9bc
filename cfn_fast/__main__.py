"""Entry point of the ``cfn-fast`` console script and of ``python -m cfn_fast``.

Hot commands go to the fast path first; click is imported only when it is
needed (help, usage errors, the other commands).
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    from cfn_fast import logs

    logs.to_stderr()  # the library logs its alerts and warnings; the command line prints them
    try:
        if args[:1] == ["_native-sent"]:  # the native program's send, reported (native_sent.py)
            from cfn_fast import native_sent

            reported = native_sent.report(args[1:])
            sys.stdout.flush()
            return reported
        from cfn_fast import _fastpath

        code = _fastpath.run(args)
        if code is None:
            from cfn_fast.cli import cli

            code = cli.main(args=args, prog_name="cfn-fast", standalone_mode=False)
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        sys.stderr.write("cfn-fast: interrupted\n")
        return 130
    except BrokenPipeError:
        # the reader went away (`cfn-fast bus receive a | head -1`): say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
