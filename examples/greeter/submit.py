"""Submit a greeter.greet task and print its result (the README's "Your own task type" guide)."""

from greeter.v1 import greeter_pb2

from herder.clients import SyncClient

with SyncClient() as client:  # $HERDER_COORDINATOR, else 127.0.0.1:50051
    handle = client.submit("greeter.greet", greeter_pb2.GreetRequest(name="Ada"))
    print(handle.result(timeout=30, output_type=greeter_pb2.Greeting).text)
