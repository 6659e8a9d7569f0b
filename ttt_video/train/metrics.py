"""Where a run's metrics go: `loss.jsonl` in the run folder (always), TensorBoard
(`train.tensorboard`, under `tensorboard/`) and Weights & Biases (`train.wandb_project`; the
`wandb` extra). A resumed run continues the same W&B run: its id is kept in the run folder."""

import json
import uuid
from pathlib import Path

from .. import config as config_lib
from ..errors import UserError
from ..fileio import write_text_atomic

SCALARS = ("loss", "grad_norm", "samples_per_s", "peak_memory_gb")
WANDB_ID_FILE = "wandb-run-id"


class MetricSinks:
    def __init__(self, out, cfg):
        out, tc = Path(out), cfg.train
        self.tensorboard = self.wandb = None
        if tc.wandb_project:
            try:
                import wandb
            except ImportError:
                raise UserError("train.wandb_project needs wandb: pip install 'ttt-video[wandb]'") from None
            id_file = out / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            write_text_atomic(id_file, run_id + "\n")
            self.wandb = wandb.init(project=tc.wandb_project, id=run_id, resume="allow", dir=str(out),
                                    name=out.name, config=config_lib.to_dict(cfg))
        if tc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(out / "tensorboard")
        self.jsonl = open(out / "loss.jsonl", "a")

    def log(self, rec, learning_rates):
        """rec: one `loss.jsonl` record (with "step"); learning_rates: {parameter group: lr}."""
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        scalars = {f"train/{k}": rec[k] for k in SCALARS}
        scalars.update({f"lr/{name}": lr for name, lr in learning_rates.items()})
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, rec["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=rec["step"])

    def close(self):
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
