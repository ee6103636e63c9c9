"""ClientApp: a center's node; its CSV comes from `--node-config 'data-csv="..."'`."""

from dqc.federated.node import client_app

app = client_app()
