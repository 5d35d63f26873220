"""The decoding engine: constrained generation with a KV cache, and target scoring.

- Prompts are packed with the training packer (``pack_rows``), so the model reads exactly
  what it was trained on: one row per prompt, positions from 0, continuous inputs as
  features. Several prompts decode together: rows are right-padded, the padding is its own
  sample (id -1), and every generated token belongs to sample 0 with its row's own next
  position, so the padding between a short prompt and its answer is never attended to.
- Decoding is constrained to the output modality's id range (plus ``<eos>``): every other
  logit, padded vocabulary ids included, is -inf, so an answer can never leave its range.
  Non-finite logits (a broken model's) still decode, deterministically, to an id of the
  range (``finite_logits``): the model gets its bad scores rather than a crash.

Axis legend: B prompts decoded together, T prompt positions (longest prompt), V vocabulary,
S generated tokens, N scored positions.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Sequence

import numpy as np
import torch

from unimodal.data_pipelines.packing import pack_rows, sample_length
from unimodal.model import Decoder
from unimodal.tokenizers.base import MODALITY_ID, Span
from unimodal.tokenizers.vocab import EOS, Tokenizers

def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """Float32 logits [..., V] with NaN and -inf as the lowest finite float, +inf as the highest.

    A broken model (NaN or overflowing weights) still decodes: a NaN is the least likely of
    the ids, a row of nothing but NaN is uniform (greedy: its first allowed id), and the
    mask applied afterwards stays the only -inf, so no id outside the range can come out.
    Finite logits are unchanged.
    """
    f = torch.finfo(torch.float32)
    return torch.nan_to_num(logits.float(), nan=f.min, posinf=f.max, neginf=f.min)


@contextmanager
def head_at(model: Decoder, index: torch.Tensor | None = None, mask: torch.Tensor | None = None):
    """Within this block the model's output head reads only the positions needed.

    - default: the last column of each row; ``forward`` returns logits [B, 1, V];
    - ``index`` int64 [B]: column ``index[b]`` of row b; logits [B, 1, V];
    - ``mask`` bool [B, T]: the True positions in row-major order; logits [1, N, V].

    Decoding needs one position's logits and scoring only the target positions'; the head
    is about a third of a small model's FLOPs per token, so this saves up to that much.
    """
    def pre_hook(module, args):
        x = args[0]  # (B, T, d)
        if mask is not None:
            return (x[mask][None],)  # (1, N, d)
        if index is None:
            return (x[:, -1:],)  # (B, 1, d)
        return (x[torch.arange(x.shape[0], device=x.device), index][:, None],)  # (B, 1, d)

    handle = model.head.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


class Engine:
    """A Decoder with its tokenizers' id ranges: generation and teacher-forced scoring.

    Attributes:
        model: the Decoder, in eval mode, on ``device``.
        toks: the Tokenizers it was trained with.
        seq_len: the training row length (the model's max_seq_len when not given).
        device: torch.device of the model.
        id_modality: int64 [V], the modality of every id (padded ids count as special).
    """

    def __init__(self, model: Decoder, toks: Tokenizers, seq_len: int | None = None):
        self.model = model.eval()
        self.toks = toks
        self.seq_len = int(seq_len or model.cfg.max_seq_len)
        self.device = next(model.parameters()).device
        V = model.cfg.vocab_size
        mod = np.full(V, MODALITY_ID["special"], dtype=np.int64)
        n = min(V, len(toks.vocab.id_modality))
        mod[:n] = toks.vocab.id_modality[:n]
        self.id_modality = torch.from_numpy(mod).to(self.device)

    def output_range(self, output: str | tuple[int, int]) -> tuple[int, int]:
        """``[start, stop)`` of a vocabulary range given by name ('text', 'code', 'value',
        'action') or directly as a pair."""
        if isinstance(output, str):
            if output not in self.toks.vocab.ranges:
                raise ValueError(f"unknown output range {output!r}; known: {list(self.toks.vocab.ranges)}")
            return self.toks.vocab.range(output)
        a, b = (int(x) for x in output)
        return a, b

    def allowed_ids(self, output: str | tuple[int, int], eos: bool = True) -> torch.Tensor:
        """Bool [V]: the ids decoding may produce (the output range, plus ``<eos>`` if ``eos``)."""
        a, b = self.output_range(output)
        allowed = torch.zeros(self.model.cfg.vocab_size, dtype=torch.bool, device=self.device)
        allowed[a:b] = True
        if eos:
            allowed[EOS] = True
        return allowed

    @staticmethod
    def _pick(logits: torch.Tensor, allowed: torch.Tensor, temperature: float, top_k: int | None,
              gen: torch.Generator | None) -> torch.Tensor:
        """Next ids [B] from logits [B, V], never outside ``allowed`` [V] (non-finite logits
        included: see ``finite_logits``)."""
        logits = logits.float() / temperature if temperature > 0 else logits
        logits = finite_logits(logits).masked_fill(~allowed, float("-inf"))  # (B, V)
        if temperature <= 0:
            return logits.argmax(-1)
        if top_k:
            k = min(int(top_k), int(allowed.sum()))
            kth = logits.topk(k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # (B, V); exactly 0 outside allowed
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence[list[Span]], output: str | tuple[int, int] = "text",
                       max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                       stop_at_eos: bool = True, seed: int | None = None, use_cache: bool = True,
                       modality: str | None = None, pick=None) -> list[list[int]]:
        """Decode several prompts together; see ``generate``. Returns one id list per prompt."""
        model, dev = self.model, self.device
        B = len(prompts)
        if B == 0:
            return []
        lengths = torch.tensor([sample_length(p) for p in prompts], device=dev)  # (B,)
        if int(lengths.min()) == 0:
            raise ValueError("cannot generate from an empty prompt")
        T = int(lengths.max())
        batch = pack_rows([[(list(p), 0)] for p in prompts], T).to(dev)  # right-padded rows
        allowed = self.allowed_ids(output, eos=stop_at_eos)
        gen = None
        if temperature > 0 and seed is not None:
            gen = torch.Generator(device=dev).manual_seed(int(seed))
        last = lengths - 1  # (B,) column of each row's last prompt token
        fixed_mod = None if modality is None else MODALITY_ID[modality]
        out = torch.empty(B, 0, dtype=torch.long, device=dev)  # (B, S)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        zeros = torch.zeros(B, 1, dtype=torch.long, device=dev)

        cache = model.new_cache(B, max_len=T + max_new_tokens) if use_cache else None
        with head_at(model, last):
            logits = model(**batch.model_inputs(), kv_cache=cache)[:, -1]  # (B, V)
        for i in range(max_new_tokens):
            tok = (pick or self._pick)(logits, allowed, temperature, top_k, gen)  # (B,)
            out = torch.cat([out, tok[:, None]], dim=1)
            if stop_at_eos:
                done |= tok == EOS
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            mod = self.id_modality[tok] if fixed_mod is None else torch.full_like(tok, fixed_mod)
            if use_cache:
                # each row's next position follows its own prompt; the padding columns
                # between them are sample -1 and invisible to sample 0
                logits = model(ids=tok[:, None], modality=mod[:, None], positions=(lengths + i)[:, None],
                               sample_ids=zeros, kv_cache=cache)[:, -1]
            else:
                logits = self._recompute(batch, out, lengths, fixed_mod)
        result = []
        for b in range(B):
            ids = out[b].tolist()
            if stop_at_eos and EOS in ids:
                ids = ids[:ids.index(EOS)]
            result.append(ids)
        return result

    def _recompute(self, batch, out: torch.Tensor, lengths: torch.Tensor, fixed_mod: int | None) -> torch.Tensor:
        """Logits [B, V] after the prompt + ``out`` [B, S], from a full forward (no cache)."""
        B, T = batch.ids.shape
        S = out.shape[1]
        mod = self.id_modality[out] if fixed_mod is None else torch.full_like(out, fixed_mod)
        ar = torch.arange(S, device=out.device)
        # flat indices into B*T move to B*(T+S) as the rows grow
        fidx = {m: (i // T) * (T + S) + i % T for m, i in batch.feature_index.items()}
        with head_at(self.model):
            logits = self.model(
            ids=torch.cat([batch.ids, out], 1), modality=torch.cat([batch.modality, mod], 1),
            positions=torch.cat([batch.positions, lengths[:, None] + ar], 1),
            sample_ids=torch.cat([batch.sample_ids, torch.zeros_like(out)], 1),
                features=batch.features, feature_index=fidx, coords=batch.coords)  # (B, 1, V)
        return logits[:, -1]

    def generate(self, spans: list[Span], output: str | tuple[int, int] = "text",
                 max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                 stop_at_eos: bool = True, seed: int | None = None, use_cache: bool = True,
                 modality: str | None = None, pick=None) -> list[int]:
        """Continue a prompt with ids of one vocabulary range.

        The prompt is packed as one row (positions from 0, continuous spans as features),
        prefilled into a KV cache, then decoded one token at a time from the cache.

        Args:
            spans: the prompt, e.g. ``task.prompt_spans(sample, toks)``.
            output: the range the answer is decoded from ('text', 'code', 'value',
                'action', or a ``(start, stop)`` pair); every other logit is -inf.
            max_new_tokens: most ids generated (the final ``<eos>`` counts).
            temperature: 0 for greedy, else softmax temperature of sampling.
            top_k: sample among the k most likely allowed ids only (None: all).
            stop_at_eos: ``<eos>`` is allowed and ends decoding; False forbids it, so
                exactly ``max_new_tokens`` ids come back.
            seed: seed of the sampling generator (None: torch's global generator).
            use_cache: False recomputes the whole sequence each step (same result, slower).
            modality: modality of the generated tokens as the model reads them back
                (default: the range's own, e.g. continuous actions pass 'action').
            pick: chooses each next id, with ``_pick``'s signature (default ``_pick``: argmax,
                or sampling); control passes ``ControlSpec.pick``.

        Returns:
            the generated ids (shared vocabulary), without the final ``<eos>``.
        """
        return self.generate_batch([spans], output, max_new_tokens, temperature, top_k,
                                   stop_at_eos, seed, use_cache, modality, pick)[0]

    @torch.inference_mode()
    def target_bits(self, samples: Sequence[list[Span]], output: str | tuple[int, int],
                    rows: int = 16) -> tuple[float, int]:
        """Teacher-forced surprisal of the target tokens of ``samples`` in ``output``'s range.

        Samples (prompt + target spans, as ``Task.to_spans`` makes them) are packed several
        to a row of ``seq_len`` positions, block-causal, as in training. Each target id
        inside the range is scored under the same constrained distribution that decoding
        uses (softmax over the range plus ``<eos>``); target ``<eos>`` tokens are not counted.

        Returns:
            (total bits, number of scored tokens).
        """
        from unimodal.data_pipelines.packing import Packer

        a, b = self.output_range(output)
        allowed = self.allowed_ids(output, eos=True)
        seq_len = max(self.seq_len, max((sample_length(s) for s in samples), default=1))
        packer = Packer(seq_len, rows, buffer_rows=1)
        batches = []
        for s in samples:
            batches += packer.add(list(s), 0)
        batches += packer.flush()
        bits, n = 0.0, 0
        for batch in batches:
            batch = batch.to(self.device)
            tgt = batch.targets  # (B, T)
            mask = (tgt >= a) & (tgt < b)
            with head_at(self.model, mask=mask):
                logits = self.model(**batch.model_inputs())[0].float()  # (N, V)
            logp = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)  # nats
            lp = logp.gather(-1, tgt[mask][:, None]).squeeze(-1)  # (N,)
            bits += float(-lp.sum()) / math.log(2)
            n += int(mask.sum())
        return bits, n
