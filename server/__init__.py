"""The Herder coordinator: gRPC services, scheduler, etcd store, election and worker sessions."""
