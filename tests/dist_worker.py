"""Run under `accelerate launch` with 2 CPU processes by tests/test_train.py (not collected by pytest).

Checks one training step of ReSSL across two gloo processes: the queue holds both processes' keys, the
teachers stay identical, and the cross-process shuffle-BN gives each process the keys of its own images
as an independent re-computation (gather, permute, embed each slice, un-permute) says they are.
"""

import json
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from ressl.method import ReSSL, shuffle_permutation

B = 8  # per process; BN groups of 4, so a random permutation almost surely changes every group


def main(out_path: str) -> None:
    acc = Accelerator(cpu=True)
    set_seed(0)
    model = ReSSL(backbone="resnet18", proj_hidden=32, proj_dim=16, predictor=False, pred_hidden=32,
                  queue_size=32, tau_s=0.1, tau_t=0.04, w_rel=1.0, w_sim=0.0, infonce_tau=0.2,
                  shuffle_bn_splits=2, shuffle_seed=7)
    opt = torch.optim.SGD(model.param_groups(0.0), lr=0.1, momentum=0.9)
    model, opt = acc.prepare(model, opt)
    core = acc.unwrap_model(model)
    g = torch.Generator().manual_seed(100 + acc.process_index)  # each process sees different images
    # 64 px: layer4 keeps 2x2 positions, so BN over a group of 2 images is not degenerate (+-1 outputs)
    weak, strong = torch.randn(B, 3, 64, 64, generator=g), [torch.randn(B, 3, 64, 64, generator=g)]
    loss, _ = model(weak, strong)
    keys = core._keys.clone()  # this process's teacher keys of the step, about to be enqueued

    # independent re-computation of the shuffled keys, before the EMA moves the teacher
    everyone = acc.gather(weak)  # [2B]: rank 0's images then rank 1's
    perm = shuffle_permutation(7, 0, 2 * B)
    with torch.no_grad():
        shuffled = torch.cat([core._embed_teacher_local(everyone[sl]) for sl in perm.view(2, B)])
        expected = F.normalize(shuffled[torch.argsort(perm)][acc.process_index * B:(acc.process_index + 1) * B], dim=1)
        local = F.normalize(core._embed_teacher_local(weak), dim=1)  # without the cross-process shuffle
    perms = acc.gather(perm.reshape(1, -1))

    acc.backward(loss)
    opt.step()
    core.update(0.9)
    all_keys = acc.gather(keys)  # [2B, D]: rank 0's B then rank 1's B
    queue_has_both = torch.allclose(core.queue.buffer[:2 * B], all_keys, atol=1e-5)
    sums = acc.gather(torch.stack([p.detach().double().sum() for p in core.teacher.parameters()]).sum().reshape(1))
    shuffle_ok = acc.gather(torch.tensor([torch.allclose(keys, expected, atol=1e-5)], dtype=torch.int64))
    shuffle_mixes = acc.gather(torch.tensor([not torch.allclose(keys, local, atol=1e-4)], dtype=torch.int64))
    if acc.is_main_process:
        with open(out_path, "w") as f:
            json.dump({"num_processes": acc.num_processes, "queue_has_both": bool(queue_has_both),
                       "teachers_equal": bool(sums[0] == sums[1]),
                       "same_permutation": bool(torch.equal(perms[0], perms[1])),
                       "shuffled_keys_match_reference": bool(shuffle_ok.all()),
                       "shuffle_changes_bn_groups": bool(shuffle_mixes.all()),
                       "shuffle_calls": core.state_dict()["_extra_state"]["shuffle_calls"]}, f)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
