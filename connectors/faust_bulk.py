"""Faust's Kafka consumer, handing chosen topics to the worker a fetch at a time.

Faust delivers every record through its conductor, a channel and a stream, one at a time. On
this project's machines that costs ~200 µs per record (bench/kafka_bench.py with py-spy: two
tasks per record in `wait_first`, the conductor's lock and queue, the stream loop), forty times
what the engine spends on a reading, so batching inside the agent (`stream.take`) cannot help:
the cost is paid before the batch is made. For the topics given here the records of each fetch
go to one handler call instead. Everything else stays Faust's: group membership, partition
assignment, table recovery, seeking to committed offsets, and the offset commits (the handler
acknowledges records with `Consumer.ack`, as a stream would). Other topics (acks, changelogs)
take Faust's usual path.

The loop below follows faust-streaming 0.15's `Consumer._drain_messages`, with the bulk branch
added; tests/runtimes/test_worker_kafka.py is what says it still fits when faust-streaming moves.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka

BulkHandler = Callable[[list[Any]], Awaitable[None]]


def bulk_consumer(handlers: Mapping[str, BulkHandler], fetch_max_wait_ms: int) -> type:
    """A Faust consumer class: records of the topics in ``handlers`` go to their handler as a
    list per fetch; a fetch waits at most ``fetch_max_wait_ms`` for records (Faust fixes 1.5 s,
    which is a reading's latency on a broker that holds fetches to the limit)."""

    class Thread(faust_aiokafka.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            consumer._fetch_max_wait_ms = fetch_max_wait_ms     # read when the consumer starts
            return consumer

    class BulkConsumer(faust_aiokafka.Consumer):
        def _new_consumer_thread(self) -> Any:
            return Thread(self, loop=self.loop, beacon=self.beacon)

        async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - Faust's loop
            callback, getmany = self.callback, self.getmany
            consumer_stopped, fetcher_stopped = self._stopped.is_set, fetcher._stopped.is_set
            read_offset = self._read_offset
            acks_enabled_for = self.app.topics.acks_enabled_for
            try:
                while not (consumer_stopped() or fetcher_stopped()):
                    records = getmany(timeout=1.0)
                    await self.sleep(0)
                    if self.should_stop:
                        continue
                    bulk: dict[str, list] = defaultdict(list)
                    async for tp, message in records:
                        offset = message.offset
                        last = read_offset[tp]
                        if last is not None and offset < last:
                            continue                   # read already (a seek went back)
                        if last and offset - last > 1 and acks_enabled_for(message.topic):
                            await self._add_gap(tp, last + 1, offset)
                        if message.topic in handlers:
                            bulk[message.topic].append(message)
                        else:
                            commit_every = self._commit_every
                            if commit_every is not None and self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                            await self.wait_first(callback(message), self.suspend_flow.wait())
                        read_offset[tp] = offset
                    for topic, messages in bulk.items():
                        # not cut short by a rebalance's flow suspension: a batch is evaluated
                        # whole, and what it covers is acknowledged only at a checkpoint
                        await handlers[topic](messages)
            except self.consumer_stopped_errors:
                if self.transport.app.should_stop:
                    return
                raise

    return BulkConsumer
