"""fsdp2_check.py's inputs: random prompt / completion rows, their micro-batch slices, a made-up
cross-tokenizer alignment for the hybrid ULD case, and each case's loss objective."""

from __future__ import annotations


def make_rows(args, count: int, with_completions: bool):
    import torch

    g = torch.Generator().manual_seed(1234)
    top = args.vocab - 3
    rows = []
    for _ in range(count):
        p = int(torch.randint(args.prompt // 2, args.prompt + 1, (1,), generator=g))
        c = int(torch.randint(args.completion // 2, args.completion + 1, (1,), generator=g))
        prompt = torch.randint(0, top, (p,), generator=g).tolist()
        completion = torch.randint(0, top, (c,), generator=g).tolist() if with_completions else []
        rows.append((prompt, completion))
    return rows


def slices(rows, micro: int):
    from axolotl_gold.data.batching import Rollout

    out = [Rollout(prompt_ids=list(p), completion_ids=list(c)) for p, c in rows]
    return [out[i: i + micro] for i in range(0, len(out), micro)]


class SyntheticCrossInputs:
    """Teacher tokens and an alignment for a made-up teacher tokenizer: student token ``t``
    becomes one teacher token (``t % 3 == 0``), two teacher tokens (``t % 3 == 1``), or
    merges with the next student token into one teacher token (``t % 3 == 2``)."""

    def __init__(self, teacher_vocab: int, pad: int):
        self.vocab, self.pad = teacher_vocab, pad

    def _tok(self, x: int) -> int:
        return (x * 7 + 11) % (self.vocab - 3)

    def __call__(self, rows) -> dict:
        from axolotl_gold.data.batching import build_scoring_batch

        t_prompts, t_comps, s_groups, t_groups = [], [], [], []
        for row in rows:
            ids = list(row.completion_ids)
            t_ids, sg, tg, i = [], [], [], 0
            while i < len(ids):
                kind = ids[i] % 3
                if kind == 2 and i + 1 < len(ids):
                    sg.append([i, i + 1])
                    tg.append([len(t_ids)])
                    t_ids.append(self._tok(ids[i] + ids[i + 1]))
                    i += 2
                elif kind == 1:
                    sg.append([i])
                    tg.append([len(t_ids), len(t_ids) + 1])
                    t_ids += [self._tok(ids[i]), self._tok(ids[i] + 1)]
                    i += 1
                else:
                    sg.append([i])
                    tg.append([len(t_ids)])
                    t_ids.append(self._tok(ids[i]))
                    i += 1
            t_prompts.append([self._tok(x) for x in row.prompt_ids])
            t_comps.append(t_ids)
            s_groups.append(sg)
            t_groups.append(tg)
        return {
            "teacher": build_scoring_batch(t_prompts, t_comps, self.pad),
            "uld_student_ids": [list(r.completion_ids) for r in rows],
            "uld_teacher_ids": t_comps,
            "uld_student_groups": s_groups,
            "uld_teacher_groups": t_groups,
        }


def make_objective(case: str, args, chunk: int):
    import torch

    from axolotl_gold.losses.uld import ULDConfig, VocabMapping
    from axolotl_gold.scoring.objectives import JsdObjective, UldObjective

    if case != "hybrid_uld":
        return JsdObjective(beta=0.5, temperature=1.0, chunk_size=chunk)
    # every other token id below both vocabularies' ends spells the same string on both sides
    shared = torch.arange(0, min(args.vocab, args.teacher_vocab) - 3, 2)
    mapping = VocabMapping(student_ids=shared.clone(), teacher_ids=shared.clone())
    tv = args.teacher_vocab
    config = ULDConfig(chunk_size=chunk, hybrid_beta=0.5)
    return UldObjective(inputs=SyntheticCrossInputs(tv, tv - 3), config=config, mapping=mapping)


def to_device(value, device):
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
