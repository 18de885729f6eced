"""The ``stagewise`` command (also ``python -m stagewise``).

Subcommands:

* ``stagewise demo``: train the embedded GPT over pipeline stages on CPU;
* ``stagewise simulate --schedule NAME --stages S --micro-batches M``: a schedule's
  simulated timeline (makespan, bubble, peak activations; ``--png`` draws it);
* ``stagewise plan --costs FILE --devices N --global-batch B``: stages, micro-batches,
  schedule and checkpointing chosen from a model's measured costs;
* ``stagewise export CKPT OUT``: one consolidated state dict from a checkpoint;
  ``stagewise export --hf CKPT OUT_DIR``: a Hugging Face ``from_pretrained`` directory.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["main"]

USAGE = """usage: stagewise {demo,simulate,plan,export} [options]

  demo       train a GPT over pipeline stages on CPU (spawns its own processes)
  simulate   the simulated timeline of a schedule
  plan       the best stages, micro-batches, schedule and checkpointing for a model
  export     a checkpoint as one consolidated state dict (or the reverse, --split;
             --hf: a Hugging Face from_pretrained directory)

Run 'stagewise COMMAND --help' for a command's options."""


def _demo(argv: list[str]) -> int:
    from stagewise.demo import demo_main

    return demo_main(argv)


def _simulate(argv: list[str]) -> int:
    from stagewise.cli.simulate import simulate_main

    return simulate_main(argv)


def _plan(argv: list[str]) -> int:
    from stagewise.cli.plan import plan_main

    return plan_main(argv)


def _export(argv: list[str]) -> int:
    if "--hf" in argv:  # a Hugging Face directory (stagewise[hf])
        from stagewise.hf.export import export_hf_main

        return export_hf_main([arg for arg in argv if arg != "--hf"])
    from stagewise.cli.export import export_main

    return export_main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "demo": _demo,
    "simulate": _simulate,
    "plan": _plan,
    "export": _export,
}


def main(argv: list[str] | None = None) -> int:
    """Run the ``stagewise`` command with ``argv`` (default: the process's arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"stagewise: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return command(args[1:])


if __name__ == "__main__":
    sys.exit(main())
