"""What the cases say about the customer: emotion per turn and per case (emotion), and issue type,
request kind and urgency (classify)."""
