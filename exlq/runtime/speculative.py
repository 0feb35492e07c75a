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

A round keeps its tokens on the device: each draft step's token (argmax, or drawn by the sampler) is the next
step's input, the acceptance test and the correction token are tensor operations, and the host reads the round's
tokens once at its end. Waiting for the GPU after every draft token instead (to read it, then to test it) made the
draft slower than no draft (0.79×, H200, 1.5B main, 0.5B draft: a draft step costs ~0.4 of a main step there).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from exlq.errors import ExlqError
from exlq.runtime.generator import GenerationResult, Generator, TokenSink, common_prefix_length
from exlq.runtime.graphs import graphs_possible
from exlq.runtime.kernels import sampling_ops
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
        if main.cache is draft.cache:
            raise ExlqError("the draft needs a Generator of its own (its own cache), even for the same model")
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
        prompt_ids = self.main.check_prompt(prompt_ids)
        if not isinstance(sampler, Sampler):
            sampler = Sampler(sampler or SamplerSettings())
        sink = TokenSink(self.main.tokenizer, stop_strings, eos_ids, on_text, max_new_tokens)
        start = time.perf_counter()
        context = list(prompt_ids)
        # Context + room for every new token and a full proposal, filled in place (drafts are
        # written after the context and overwritten when rejected): no per-round tensor building.
        room = sink.room(self.main.max_seq_len, len(context))
        history = torch.empty(1, len(context) + room + self.max_draft_tokens, dtype=torch.long, device=self.main.model.device)
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

    def _verify_length(self, tokens: int) -> tuple[int, bool]:
        """Length of the verification forward for `tokens` real ones, and whether it replays a graph."""
        graphs = graphs_possible(self.main.model, self.main.cache)
        room = self.main.max_seq_len - self.main.cache.seq_len
        return (min(self.max_draft_tokens + 1, room) if graphs else tokens), graphs

    def _round(self, context: list[int], history: torch.Tensor, k: int, sampler: Sampler) -> tuple[list[int], int]:
        """Propose k draft tokens after `context`, verify them; return the new tokens and how many drafts stood.

        Everything stays on the device until the end, where the host reads the round's tokens in one go:
        each draft step's token is the next step's input, and the acceptance test and the correction token
        are tensor operations. `history[0, :len(context)]` holds the context (for repetition penalties);
        the drafts are written after it.
        """
        device = self.main.model.device
        n = len(context)
        settings = sampler.settings
        greedy = settings.greedy and settings.repetition_penalty == 1.0  # acceptance is argmax equality
        last = torch.tensor([[context[-1]]], dtype=torch.long, device=device)
        step, drafted, draft_probs = last, [last], []
        for i in range(k):
            logits = self.draft.run_tensor(step, max_output_len=1)[:, -1].to(device)
            if greedy:
                step = sampling_ops.argmax(logits)[:, None]
            else:
                probs = sampler.probabilities(logits, history[:, : n + i])
                step = sampler.draw(probs)[:, None]
                history[0, n + i] = step[0, 0]
                draft_probs.append(probs[0])
            drafted.append(step)
        length, graphs = self._verify_length(k + 1)
        ids = torch.cat(drafted + drafted[-1:] * (length - k - 1), dim=1)  # padded to the graph's length
        main_logits = self.main.run_tensor(ids, max_output_len=None, graph_step=graphs)[0, : k + 1]
        drafts = ids[0, 1 : k + 1]
        if greedy:
            choices = sampling_ops.argmax(main_logits)
            accepted = (drafts == choices[:k]).long().cumprod(0).sum()
            fixed = choices[accepted]
        else:
            q = torch.stack(draft_probs) if k else None
            accepted, fixed = self._accept(sampler, main_logits, q, drafts, history, n)
        values = torch.cat([ids[0], accepted.view(1), fixed.view(1)]).tolist()  # the round's one wait for the GPU
        verified, accepted_count = values[:length], values[length]
        self.draft.record(verified[:k])  # the draft ran the last context token and every draft but the last
        self.main.record(verified)
        self.main.rewind(n + accepted_count)  # context + accepted drafts stay; padding and rejected drafts go
        return [*verified[1 : 1 + accepted_count], values[length + 1]], accepted_count

    @staticmethod
    def _accept(
        sampler: Sampler, main_logits: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor, history: torch.Tensor,
        n: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Speculative sampling on the device: how many drafts stand (u·q(d) < p(d), i.e. u < p/q without dividing
        by q = 0), and the token after them: from norm(max(0, p − q)) at the first rejection, else from p."""
        k = drafts.numel()
        p = torch.cat([sampler.probabilities(main_logits[i : i + 1], history[:, : n + i]) for i in range(k + 1)])
        q = torch.zeros_like(p) if q is None else torch.cat([q, torch.zeros_like(p[:1])])  # nothing drafted at k
        rows = torch.arange(k, device=p.device)
        stood = sampler.uniforms(k, p.device) * q[rows, drafts] < p[rows, drafts]
        accepted = stood.long().cumprod(0).sum()
        residual = (p[accepted] - q[accepted]).clamp_min(0)
        fixed = sampler.draw(torch.where(residual.sum() > 0, residual, p[accepted])[None])[0]
        return accepted, fixed
