"""Text in, text out: encode prompts, decode, cut at stop strings, stream, render chat templates.

    loaded = load_model(checkpoint="runs/demo/train")          # model.load: weights from any source
    decoder, tokenizer = Decoder(loaded.config, loaded.graphdef, loaded.params), model_tokenizer(loaded)
    [result] = generate(decoder, ["def fib(n):"], tokenizer, SamplingParams(max_new_tokens=40, temperature=0.7))
    for piece in stream_text(decoder, "def fib(n):", tokenizer, SamplingParams(max_new_tokens=40)):
        print(piece, end="", flush=True)

`generate` takes a SpeculativeDecoder (a target and a draft Decoder) in place of a Decoder for speculative
sampling. A released
model (`load_model(model="smollm2-135m")`, `gguf=...`) brings its own tokenizer and chat template (`render_chat`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from infer.decode import Decoder, Generation, per_prompt
from infer.sampling import InferenceError, SamplingParams

if TYPE_CHECKING:
    from data.tokenizer import Tokenizer
    from model.load import LoadedModel

DEFAULT_SAMPLING = SamplingParams()


def model_tokenizer(loaded: LoadedModel) -> Tokenizer:
    """The tokenizer that a loaded model's description names (`LoadedModel.tokenizer`), loaded; an
    InferenceError asking for one when the source names none."""
    from data.tokenizer import load_tokenizer

    if not loaded.tokenizer:
        raise InferenceError(f"{loaded.source} comes without a tokenizer meshlm reads: pass --tokenizer "
                             "(a .gguf file, a .tiktoken file, a token store, cl100k_base or o200k_base)")
    return load_tokenizer(loaded.tokenizer)


def render_chat(template: str, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """A chat template (Jinja, as in Hugging Face tokenizer configs and GGUF metadata) rendered."""
    import jinja2
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise InferenceError(f"chat template: {message}")

    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
        raise InferenceError(f"chat template: {e}") from e


def _encode(prompts: Sequence[str | Sequence[int]], tokenizer) -> list[list[int]]:
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise InferenceError(f"prompt {i} is text but no tokenizer was given")
            encoded.append(tokenizer.encode(prompt))
        else:
            encoded.append([int(t) for t in prompt])
    return encoded


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text before the first stop string (and whether one was found)."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate(decoder: Decoder, prompts: Sequence[str | Sequence[int]], tokenizer=None,
             params: SamplingParams | Sequence[SamplingParams] = DEFAULT_SAMPLING, draft: Decoder | None = None,
             draft_tokens: int = 4, truncate: bool = False, stats: list | None = None) -> list[Generation]:
    """Continue each prompt (text or token ids); text results when a tokenizer is given, cut before the
    first stop string. With `draft`, speculative sampling proposes `draft_tokens` tokens per round
    (`stats`, when a list, receives its SpeculativeStats)."""
    ids = _encode(prompts, tokenizer)
    params = per_prompt(params, len(ids))
    if draft is not None:
        from infer.speculative import speculative_generate

        results = speculative_generate(decoder, draft, ids, params, k=draft_tokens, truncate=truncate, stats=stats)
    else:
        results = decoder.generate_ids(ids, params, truncate=truncate)
    if tokenizer is not None:
        for result, p in zip(results, params, strict=True):
            result.text, stopped = _cut_at_stop(tokenizer.decode(result.token_ids), p.stop)
            if stopped:
                result.finish_reason = "stop"
                keep = _tokens_for_text(result.token_ids, result.text, tokenizer)
                result.token_ids, result.logprobs = result.token_ids[:keep], result.logprobs[:keep]
                result.top_logprobs = result.top_logprobs[:keep]
    return results


def _tokens_for_text(ids: list[int], text: str, tokenizer) -> int:
    """The most leading tokens whose text is a prefix of `text` (the text before a stop string)."""
    keep = 0
    for n in range(1, len(ids) + 1):
        if not text.startswith(tokenizer.decode(ids[:n])):
            break
        keep = n
    return keep


class TextStream:
    """Incremental detokenisation of one continuation: `add` token ids as they come and get back the text
    that is safe to show. Text that could be the start of a stop string, and a partly decoded character,
    are held back until known not to be; at a stop string the text ends (the stop string is not shown)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.sent = 0  # characters handed out
        self.stopped = False
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def add(self, ids: Sequence[int]) -> str:
        """The new text the tokens `ids` make showable ("" when none; nothing after a stop string)."""
        if self.stopped:
            return ""
        self.ids += ids
        text, self.stopped = _cut_at_stop(self.tokenizer.decode(self.ids), self.stop)
        limit = len(text) if self.stopped else min(len(text) - self._hold, len(text.rstrip("\ufffd")))
        return self._hand_out(text, limit)

    def finish(self) -> str:
        """What is left once no more tokens come."""
        if self.stopped:
            return ""
        text, _ = _cut_at_stop(self.tokenizer.decode(self.ids), self.stop)
        return self._hand_out(text, len(text))

    def _hand_out(self, text: str, limit: int) -> str:
        if limit <= self.sent:
            return ""
        piece, self.sent = text[self.sent:limit], limit
        return piece


def stream_text(decoder: Decoder, prompt: str | Sequence[int], tokenizer, params: SamplingParams = DEFAULT_SAMPLING,
                chunk: int = 4, truncate: bool = False) -> Iterator[str]:
    """Yield the continuation's text as it is generated, `chunk` tokens per decode call (see TextStream for
    what is held back); generation stops at a stop string, which is not yielded."""
    text = TextStream(tokenizer, params.stop)
    for [new] in decoder.stream_ids(_encode([prompt], tokenizer), [params], chunk=chunk, truncate=truncate):
        piece = text.add(new)
        if piece:
            yield piece
        if text.stopped:
            return
    piece = text.finish()
    if piece:
        yield piece
