"""Speculative decoding: a small draft model proposes tokens, the main model checks them in one forward.

Exact speculative sampling (Leviathan et al., Chen et al.): draft token d with draft probability
q(d) is accepted with probability min(1, p(d)/q(d)) under the main model's p; on rejection the
token is drawn from norm(max(0, p − q)). The output then follows the main model's distribution
at any sampling setting (p and q are the sampler's final distributions, filters included), and
greedy output is exactly the main model's greedy output.

Both generators keep their caches equal to the accepted text minus its last token, which has not
been run yet; rejected positions are rewound. Near max_seq_len the draft proposes only what the
main cache can still take, so generation ends exactly where plain decoding would.

On a GPU the verification forward replays a CUDA graph, as one-token decode steps do: eager, its
host time alone was ~6x a replayed decode step (H200, 1.5B main model), which made speculative
decoding 7x slower than plain decoding. A graph needs one shape, so the k+1 tokens are padded to
`max_draft_tokens` + 1 (where the cache has room): the padding's keys land beyond the accepted
text, where the rewind drops them, and no real position attends to them (causal mask).

Greedy rounds (no repetition penalty) keep the draft tokens on the GPU: each draft step's argmax is the next step's
input, and the host reads the drafts and the main model's choices once per round. The general round waits for the
GPU after every draft token (to draw it, and for the acceptance test); with a draft step costing ~0.4 of a main
step on a host-bound GPU (0.5B draft, 1.5B main, H200), those waits alone made the draft slower than no draft.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from exlq.errors import ExlqError
from exlq.runtime.generator import GenerationResult, Generator, TokenSink, common_prefix_length
from exlq.runtime.graphs import graphs_possible
from exlq.runtime.sampler import Sampler, SamplerSettings


def check_same_vocabulary(main: Generator, draft: Generator) -> None:
    """Speculative sampling compares the two models token by token: their vocabularies must be one."""
    same = (
        main.model.config.vocab_size == draft.model.config.vocab_size
        and main.tokenizer.backend.get_vocab(with_added_tokens=True) == draft.tokenizer.backend.get_vocab(with_added_tokens=True)
    )
    if not same:
        raise ExlqError("the draft model's tokenizer/vocabulary differs from the main model's; use a draft of the same family")


class SpeculativeGenerator:
    """Generation with a draft model; `draft_tokens` is the starting (and typical) proposal length."""

    def __init__(self, main: Generator, draft: Generator, *, draft_tokens: int = 4, adaptive: bool = True):
        if draft_tokens < 1:
            raise ExlqError(f"draft tokens must be at least 1 (got {draft_tokens})")
        check_same_vocabulary(main, draft)
        if draft.max_seq_len < main.max_seq_len:
            raise ExlqError(f"the draft cache ({draft.max_seq_len}) must be at least as long as the main one ({main.max_seq_len})")
        self.main, self.draft = main, draft
        self.draft_tokens = draft_tokens
        self.max_draft_tokens = 2 * draft_tokens if adaptive else draft_tokens
        self.adaptive = adaptive

    def _proposal_length(self, current: int, new_so_far: int, max_new_tokens: int) -> int:
        room = self.main.max_seq_len - self.main.cache.seq_len - 1  # the main forward runs 1 + k tokens
        return max(0, min(current, room, max_new_tokens - new_so_far - 1))

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        sampler: SamplerSettings | Sampler | None = None,
        max_new_tokens: int = 256,
        stop_strings: Sequence[str] = (),
        eos_ids: Sequence[int] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Generator.generate with the draft's help: same arguments, same result, same distribution."""
        self.main.check_prompt(prompt_ids)
        if not isinstance(sampler, Sampler):
            sampler = Sampler(sampler or SamplerSettings())
        sink = TokenSink(self.main.tokenizer, stop_strings, eos_ids, on_text, max_new_tokens)
        start = time.perf_counter()
        context = list(prompt_ids)
        # Context + room for every new token and a full proposal, filled in place (drafts are
        # written after the context and overwritten when rejected): no per-round tensor building.
        history = torch.empty(1, len(context) + max_new_tokens + self.max_draft_tokens, dtype=torch.long, device=self.main.model.device)
        history[0, : len(context)] = torch.tensor(context, dtype=torch.long)
        reused = common_prefix_length(self.main.cached_ids, context[:-1])
        proposed = accepted_total = 0
        first_token_at = None
        k = self.draft_tokens
        while True:
            self.main.sync(context[:-1])
            self.draft.sync(context[:-1])
            if self.main.cache.seq_len + 1 > self.main.max_seq_len:
                sink.stop_reason = "max_seq_len"
                break
            k_now = self._proposal_length(k, len(sink.token_ids), max_new_tokens)
            tokens, accepted = self._round(context, history, k_now, sampler)
            proposed += k_now
            accepted_total += accepted
            if first_token_at is None:
                first_token_at = time.perf_counter()
            if self.adaptive and k_now:
                k = min(k + 1, self.max_draft_tokens) if accepted == k_now else max(1, k - 1) if accepted < k_now / 2 else k
            go_on = True
            for token in tokens:
                go_on = sink.push(token)
                if not go_on:
                    break
                history[0, len(context)] = token
                context.append(token)
            if not go_on:
                break
        result = sink.result(prompt_ids, reused, start, first_token_at)
        result.draft_proposed, result.draft_accepted = proposed, accepted_total
        return result

    def _verify(self, ids: list[int]) -> torch.Tensor:
        """Main-model logits [len(ids), vocab] of every position of `ids` (the last context token and the drafts).

        With CUDA graphs, padded to one length (repeating the last id) and replayed; eager otherwise."""
        length, graphs = self._verify_length(len(ids))
        padded = ids + [ids[-1]] * (length - len(ids))
        return self.main.run(padded, max_output_len=None, graph_step=graphs)[0, : len(ids)]

    def _verify_length(self, tokens: int) -> tuple[int, bool]:
        """Length of the verification forward for `tokens` real ones, and whether it replays a graph."""
        graphs = graphs_possible(self.main.model, self.main.cache)
        room = self.main.max_seq_len - self.main.cache.seq_len
        return (min(self.max_draft_tokens + 1, room) if graphs else tokens), graphs

    def _greedy_round(self, context: list[int], k: int) -> tuple[list[int], int]:
        """`_round` for greedy sampling, with one host wait: drafts chain on the GPU, acceptance is argmax equality."""
        device = self.main.model.device
        last = torch.tensor([[context[-1]]], dtype=torch.long, device=device)
        step, drafted = last, []
        for _ in range(k):
            step = self.draft.run_tensor(step, max_output_len=1)[:, -1].argmax(dim=-1, keepdim=True)
            drafted.append(step)
        length, graphs = self._verify_length(k + 1)
        ids = torch.cat([last, *drafted, *[drafted[-1]] * (length - k - 1)], dim=1)
        best = self.main.run_tensor(ids, max_output_len=None, graph_step=graphs)[0, : k + 1].argmax(dim=-1)
        values = torch.cat([ids[0], best]).tolist()  # the round's one wait for the GPU
        verified, choices = values[:length], values[length:]
        drafts = verified[1 : k + 1]
        accepted = next((i for i, (d, c) in enumerate(zip(drafts, choices)) if d != c), k)
        self.draft.record(verified[:k])
        self.main.record(verified)
        self.main.rewind(len(context) + accepted)
        return [*drafts[:accepted], choices[accepted]], accepted

    def _round(self, context: list[int], history: torch.Tensor, k: int, sampler: Sampler) -> tuple[list[int], int]:
        """Propose k draft tokens after `context`, verify them; return the new tokens and how many drafts stood.

        `history[0, :len(context)]` holds the context; the drafts are written after it.
        """
        settings = sampler.settings
        if k and settings.greedy and settings.repetition_penalty == 1.0 and self.draft.model.device == self.main.model.device:
            return self._greedy_round(context, k)
        device = self.main.model.device
        n = len(context)
        drafts: list[int] = []
        draft_probs: list[torch.Tensor] = []
        for i in range(k):
            logits = self.draft.run([drafts[-1] if drafts else context[-1]], max_output_len=1)[:, -1]
            probs = sampler.probabilities(logits.to(device), history[:, : n + i])
            token = int(sampler.draw(probs)[0])
            history[0, n + i] = token
            drafts.append(token)
            draft_probs.append(probs[0])
        main_logits = self._verify([context[-1], *drafts])  # [k + 1, vocab]
        accepted, fixed = k, None
        for i, token in enumerate(drafts):
            p = sampler.probabilities(main_logits[i : i + 1], history[:, : n + i])[0]
            q = draft_probs[i]
            if sampler.uniform(device) * float(q[token]) < float(p[token]):  # u < p/q, without dividing by q = 0
                continue
            residual = torch.clamp(p - q, min=0)
            total = float(residual.sum())
            accepted, fixed = i, int(sampler.draw((residual / total if total > 0 else p)[None])[0])
            break
        if fixed is None:  # every draft stood: one more token from the main model's last position
            fixed = int(sampler.draw(sampler.probabilities(main_logits[k : k + 1], history[:, : n + k]))[0])
        # The main cache keeps context + accepted drafts; the draft's cache is resynced next round.
        self.main.rewind(n + accepted)
        return [*drafts[:accepted], fixed], accepted
