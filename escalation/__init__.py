"""What follows a new alert group: routes, escalation chains, notifiers, heartbeats, maintenance."""
