"""The reference order-processing system: six services, every pattern in a place of its own.

Orders, Inventory, Payments, Shipping, Customers and Email each own a store and talk only through
integration events and commands on the bus. Where to look for each pattern:

=================================  ===================================================================
choreography                       the ``wire_choreography`` functions of :mod:`.orders`,
                                   :mod:`.inventory`, :mod:`.payments`, :mod:`.shipping` (handlers
                                   named ``<act>_when_<event>``)
orchestration                      :mod:`.orchestration` (the checkout saga) and the
                                   ``wire_orchestration`` functions (command handlers ``*_on_command``)
event notification                 :mod:`.emails` (thin ``OrderConfirmed``) + :class:`.orders.OrderQueries`
                                   (a call in one process, HTTP via :mod:`.orders_api` across processes)
event-carried state transfer       :mod:`.customers` (publishes full addresses) and
                                   :func:`.shipping.wire_address_replica` (keeps a replica)
domain vs integration events       :func:`.orders.wire_translations`, :func:`.customers.wire_translations`
idempotency                        :mod:`.duplicates` injects duplicates; inboxes and the aggregates
                                   (``Order``, ``StockItem``, ``Payment``, ``Shipment``) absorb them
public contracts                   :mod:`.contracts`
=================================  ===================================================================

Run it with :func:`.runner.run_shop` or ``python -m tidings.demo.shop`` (see :mod:`.cli`).
"""
