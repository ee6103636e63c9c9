"""The ServerApp and the center nodes' ClientApp in one process, each message handed to its
node at once: no Ray, no network, the same server and node code as a simulation.

What it is for: runs whose cost should be the QC and not the Simulation Engine's start
(Ray and a TensorFlow worker process per run: about a minute on two busy cores), such as
the fault-injection tests, and debugging with a plain stack trace. What it skips: Flower's
transport (messages are not serialized; their arrays are, inside `ArrayRecord`), and the
nodes run one after the other in the server's process.
"""

from __future__ import annotations

from typing import Iterable, Sequence
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

#: The run, and the server's node id (Flower's SuperLink is node 0); nodes count from 1.
RUN_ID, SERVER_NODE = 1, 0


class InProcessGrid(Grid):
    """A `Grid` whose nodes are one ClientApp called in this process, one `Context` each (the
    Simulation Engine's node config: `partition-id`, `num-partitions`)."""

    def __init__(self, client: ClientApp, num_nodes: int):
        self.client = client
        self.contexts = {i + 1: Context(RUN_ID, i + 1, {"partition-id": i,
                                                        "num-partitions": num_nodes},
                                        RecordDict(), {}) for i in range(num_nodes)}
        self.replies: dict[str, Message] = {}

    def set_run(self, run_id: int) -> None:  # one run only
        pass

    @property
    def run(self):
        raise NotImplementedError("the in-process grid has no Run record")

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def get_nodes(self):
        return []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Each message answered by its node now; its id, as Flower's own in-memory grid
        gives one."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self.replies[msg.metadata.message_id] = self.client(
                msg, self.contexts[msg.metadata.dst_node_id])
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_in_process(server: ServerApp, client: ClientApp, num_nodes: int,
                   run_config: Sequence[tuple[str, object]] = ()) -> None:
    """`flwr.simulation.run_simulation` without Ray: the ServerApp's main with a grid of
    `num_nodes` nodes. Flower's task identity (which every new `Message` reads) is set for
    the run and put back after it."""
    saved = {k: getattr(TaskIdentity, f"_{k}") for k in ("task_id", "run_id", "node_id")}
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SERVER_NODE
    try:
        server(InProcessGrid(client, num_nodes),
               Context(RUN_ID, SERVER_NODE, {}, RecordDict(), dict(run_config)))
    finally:
        for key, value in saved.items():
            setattr(TaskIdentity, f"_{key}", value)
