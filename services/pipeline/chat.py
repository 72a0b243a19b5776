"""One request through the pipeline: media -> manifests, the prompt rendered, the decoder's stream.

`ChatPipeline.start(job)` resolves the job's media (`MediaResolver`), renders the chat template
with each image block's placeholder count (or takes a completion's token ids), sends the decoder a
`GenerateRequest` whose segments are cache keys, and waits for the stream's first message. If the
decoder says the embeddings are gone (`NotCachedError`: evicted from Redis, or the encoder replica
that held them restarted), the request's manifests are dropped and the media prepared again, once.
Errors before the first message raise from `start`, while a front end can still answer with a
status; later ones raise from the stream.

Both front ends (OpenAI HTTP and kimi_vl.v1.Chat) build a `ChatJob` and call `start`. Knows nothing
about Ray, HTTP or gRPC servers: the decoder call is injected.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from protos.kimi_vl.v1 import chat_pb2
from protos.kimi_vl.v1 import generate_pb2 as pb
from services.common.chat_template import encode_chat, expand_media
from services.common.errors import InternalError, NotCachedError
from services.common.tokenizer import KimiTokenizer
from services.decoder.engine.params import SamplingParams
from services.decoder.service.messages import sampling_to_proto
from services.pipeline.manifest import MediaManifest
from services.pipeline.media import MediaResolver, MediaSource, MediaStats
from services.preprocess.settings import VideoOptions

logger = logging.getLogger(__name__)

Generate = Callable[[pb.GenerateRequest], AsyncIterator[chat_pb2.ChatResponse]]


@dataclass(frozen=True)
class ChatJob:
    """A validated request, as either front end makes it.

    messages: chat messages for the template, media parts as {"type": "image"|"video",
              "media_index": k} (openai_convert.chat_messages); None for a completion.
    prompt_ids: a completion's token ids; None for a chat.
    media: the sources of media_index 0, 1, ... in prompt order.
    """

    request_id: str
    params: SamplingParams
    messages: list[dict[str, Any]] | None = None
    prompt_ids: list[int] | None = None
    media: list[MediaSource] = field(default_factory=list)
    video: VideoOptions | None = None
    split_reasoning: bool | None = None
    timeout_s: float | None = None


@dataclass
class Started:
    """A request the decoder has begun answering."""

    prompt_ids: list[int]
    responses: AsyncGenerator[chat_pb2.ChatResponse, None]  # the first one included
    media: MediaStats


class ChatPipeline:
    def __init__(self, tokenizer: KimiTokenizer, resolver: MediaResolver, generate: Generate) -> None:
        self.tokenizer = tokenizer
        self.resolver = resolver
        self._generate = generate

    async def start(self, job: ChatJob) -> Started:
        sampling = self.resolver.sampling(job.video)
        for attempt in range(2):
            manifests, stats = await self.resolver.resolve(job.media, sampling, refresh=attempt > 0)
            prompt_ids = self.prompt_ids(job, manifests)
            stream = aiter(self._generate(self._request(job, prompt_ids, manifests)))
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                raise InternalError(f"the decoder gave no output for {job.request_id}") from None
            except NotCachedError as e:
                await _close(stream)
                if attempt or not job.media:
                    raise
                logger.info("%s: embeddings gone (%s); preparing the media again", job.request_id, e)
                await self.resolver.forget(stats.manifest_keys)
                continue
            except BaseException:  # cancelled (client gone, deadline) or failed: stop the decoder too
                await asyncio.shield(_close(stream))
                raise
            return Started(prompt_ids, _chain(first, stream), stats)
        raise InternalError("unreachable")

    def prompt_ids(self, job: ChatJob, manifests: Sequence[MediaManifest]) -> list[int]:
        if job.messages is None:
            if job.prompt_ids is None:
                raise InternalError("a job needs messages or prompt_ids")
            return list(job.prompt_ids)
        messages = expand_media(job.messages, [m.content_parts() for m in manifests])
        counts = [s.num_tokens for m in manifests for s in m.segments]
        return encode_chat(self.tokenizer, messages, image_token_counts=counts).input_ids

    @staticmethod
    def _request(
        job: ChatJob, prompt_ids: list[int], manifests: Sequence[MediaManifest]
    ) -> pb.GenerateRequest:
        media = [
            pb.MediaEmbeddings(
                segments=[
                    pb.EmbeddingSegment(
                        num_tokens=s.num_tokens,
                        cache_key=s.cache_key,
                        timestamp=s.timestamp,
                        encoder_endpoint=s.encoder_endpoint,
                    )
                    for s in m.segments
                ]
            )
            for m in manifests
        ]
        sampling = sampling_to_proto(job.params, split_reasoning=job.split_reasoning, timeout_s=job.timeout_s)
        return pb.GenerateRequest(
            request_id=job.request_id, tokens=pb.PromptTokens(ids=prompt_ids), media=media, sampling=sampling
        )


async def _chain(
    first: chat_pb2.ChatResponse, rest: AsyncIterator[chat_pb2.ChatResponse]
) -> AsyncGenerator[chat_pb2.ChatResponse, None]:
    try:
        yield first
        async for msg in rest:
            yield msg
    finally:
        await _close(rest)


async def _close(stream: AsyncIterator[Any]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
