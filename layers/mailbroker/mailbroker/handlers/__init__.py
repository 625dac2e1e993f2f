"""Event shaping for each function: parse the trigger's event, call the domain, shape the answer.
The files under functions/ only add the Powertools decorator stack around these."""
