"""ServerApp: the travelling loop and the QC policy, with training steps on the nodes."""

from dqc.federated.server import server_app

app = server_app()
