"""Policy state: the sender registry, recipient flags, rates, throttles, audiences, business
hours and the quarantine: what the checks consult and administrators change."""
