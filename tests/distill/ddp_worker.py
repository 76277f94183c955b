"""Launched by test_multiprocess.py under `accelerate launch`: run scripts/distill.py's main, then save
this rank's student weights to RANK_DIR/rank<N>.safetensors so the test can compare the ranks."""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import save_file


def main() -> int:
    rank_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    import llmslim.distill.run as run
    from llmslim.cli import script_main

    results = []
    real_distill = run.distill

    def recording_distill(*args, **kwargs):
        results.append(real_distill(*args, **kwargs))
        return results[-1]

    run.distill = recording_distill  # llmslim.cli.distill.run imports distill from the module at call time
    code = script_main("distill", argv)
    if code == 0:
        from accelerate import PartialState

        state = {k: v.contiguous() for k, v in results[0].student.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(rank_dir / f"rank{PartialState().process_index}.safetensors"))
    return code


if __name__ == "__main__":
    sys.exit(main())
