"""Run under `accelerate launch` with 2 CPU processes by tests/test_train.py (not collected by pytest)."""

import json
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ressl.method import ReSSL


def main(out_path: str) -> None:
    acc = Accelerator(cpu=True)
    set_seed(0)
    model = ReSSL(backbone="resnet18", proj_hidden=32, proj_dim=16, predictor=False, pred_hidden=32,
                  queue_size=16, tau_s=0.1, tau_t=0.04, w_rel=1.0, w_sim=0.0, infonce_tau=0.2)
    opt = torch.optim.SGD(model.param_groups(0.0), lr=0.1, momentum=0.9)
    model, opt = acc.prepare(model, opt)
    core = acc.unwrap_model(model)
    g = torch.Generator().manual_seed(100 + acc.process_index)  # each process sees different images
    weak, strong = torch.randn(4, 3, 32, 32, generator=g), [torch.randn(4, 3, 32, 32, generator=g)]
    loss, _ = model(weak, strong)
    acc.backward(loss)
    opt.step()
    keys = core._keys.clone()  # this process's teacher keys of the step, about to be enqueued
    core.update(0.9)
    all_keys = acc.gather(keys)  # [8, D]: rank 0's 4 then rank 1's 4
    queue_has_both = torch.allclose(core.queue.buffer[:8], all_keys, atol=1e-5)
    sums = acc.gather(torch.stack([p.detach().double().sum() for p in core.teacher.parameters()]).sum().reshape(1))
    if acc.is_main_process:
        with open(out_path, "w") as f:
            json.dump({"num_processes": acc.num_processes, "queue_has_both": bool(queue_has_both),
                       "teachers_equal": bool(sums[0] == sums[1])}, f)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
