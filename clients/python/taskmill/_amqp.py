"""The publishing side of the client: one channel in confirm mode on pika's asynchronous
``SelectConnection``, driven from the caller's thread.

pika's ``BlockingChannel`` waits for each publisher confirm before the next publish returns
(one broker round trip a batch); its asynchronous connection takes confirms by callback, so
many can be in flight. Its I/O loop runs only while the client waits for something (the
channel to open, confirms to come back, output to be written), so no thread is started and
every callback runs in the caller's thread.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import pika
import pika.exceptions

# One declaration: the channel method's name, its positional and keyword arguments.
Declare = Tuple[str, tuple, dict]


class ConfirmChannel:
    """A connection and one channel in confirm mode, with the topology declared on it.

    ``on_confirm(frame)`` gets each ack or nack, ``on_return(properties)`` each returned
    (unroutable) message. A lost connection or channel is raised, as pika's own exception,
    by the next call that waits; after that the object is closed and a new one is needed.
    """

    def __init__(self, url: str, declares: List[Declare],
                 on_confirm: Callable[[Any], None],
                 on_return: Callable[[pika.BasicProperties], None]) -> None:
        self._on_confirm = on_confirm
        self._on_return = on_return
        self._declares = list(declares)
        self._error: Optional[BaseException] = None
        self._ready = False
        self._closed = False
        self._running = False
        self._until: Optional[Callable[[], bool]] = None
        self._channel: Any = None
        self._connection = pika.SelectConnection(
            pika.URLParameters(url),
            on_open_callback=self._opened,
            on_open_error_callback=self._failed,
            on_close_callback=self._connection_closed,
        )
        try:
            self.wait(lambda: self._ready)
        except BaseException:
            self.close()
            raise

    # What the client calls ------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._ready and self._error is None

    def publish(self, exchange: str, routing_key: str, body: bytes,
                properties: pika.BasicProperties) -> None:
        """Buffers one mandatory publish; it is written while the loop runs next."""
        self._raise_if_lost()
        self._channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)

    def wait(self, until: Callable[[], bool]) -> None:
        """Runs the I/O loop until ``until()`` holds (checked after every event), or raises
        what closed the connection or channel."""
        while True:
            self._raise_if_lost()
            if until():
                return
            self._until = until
            self._run()

    def pump(self) -> None:
        """Writes what is buffered and reads what has arrived, without waiting for more."""
        self._raise_if_lost()
        self._until = None
        self._connection.ioloop.call_later(0, self._stop)
        self._run()
        self._raise_if_lost()

    def close(self) -> None:
        """Closes the connection (waiting for the broker's answer); never raises."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._connection.is_open:
                self._connection.close()
            if not self._connection.is_closed:
                self._until = lambda: bool(self._connection.is_closed)
                self._run()
        except Exception:  # closing a connection that went anyway
            pass

    # The loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        self._running = True
        try:
            self._connection.ioloop.start()
        finally:
            self._running = False

    def _stop(self) -> None:
        if self._running:
            self._connection.ioloop.stop()

    def _poke(self) -> None:
        """After an event: stops the loop once what it waits for holds."""
        if self._error is not None or (self._until is not None and self._until()):
            self._stop()

    def _raise_if_lost(self) -> None:
        if self._error is not None:
            raise self._error

    def _lost(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._stop()

    # pika's callbacks -------------------------------------------------------------------
    def _failed(self, _connection: Any, error: BaseException) -> None:
        self._closed = True
        self._lost(error)

    def _connection_closed(self, _connection: Any, reason: BaseException) -> None:
        self._closed = True
        self._lost(reason if isinstance(reason, pika.exceptions.AMQPError)
                   else pika.exceptions.ConnectionClosed(0, repr(reason)))

    def _opened(self, connection: Any) -> None:
        connection.channel(on_open_callback=self._channel_opened)

    def _channel_opened(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(lambda _ch, reason: self._lost(reason))
        channel.add_on_return_callback(
            lambda _ch, _method, props, _body: self._returned(props))
        self._declare_next(None)

    def _declare_next(self, _frame: Any) -> None:
        if self._declares:
            name, args, kwargs = self._declares.pop(0)
            getattr(self._channel, name)(*args, callback=self._declare_next, **kwargs)
        else:
            self._channel.confirm_delivery(ack_nack_callback=self._confirmed,
                                           callback=self._selected)

    def _selected(self, _frame: Any) -> None:
        self._ready = True
        self._poke()

    def _confirmed(self, frame: Any) -> None:
        self._on_confirm(frame)
        self._poke()

    def _returned(self, props: pika.BasicProperties) -> None:
        self._on_return(props)
        self._poke()
