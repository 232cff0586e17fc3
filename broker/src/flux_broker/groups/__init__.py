"""Consumer groups: assignors, the group state machine, the coordinator and subscription fencing.

Start with :mod:`flux_broker.groups.state` (the state and its transitions, pure), then
:mod:`flux_broker.groups.assignor`; :mod:`flux_broker.groups.coordinator` runs them against the
metadata store and the clock, :mod:`flux_broker.groups.fencing` holds the one group subscriber
per partition. Nothing is imported here, so the metadata layer can use the pure modules without
pulling in the coordinator.
"""
