"""The node: the kubelet's checkpoint API and the node-local checkpoint directory."""
