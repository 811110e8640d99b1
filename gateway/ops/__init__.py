"""The operations surface: the gateway command, the admin listener (metrics, health, status page,
API), the decision log and audit trail, reload, explain and trace."""
