//! The standard gRPC services integrations expect: `grpc.health.v1` on the mTLS listener
//! (grpc_health_probe with a client certificate) and as plain HTTP/2 on the admin listener
//! (Kubernetes gRPC probes speak no TLS), and server reflection on the mTLS listener (grpcurl
//! lists and calls the Fleet API with an operator certificate).

use guardian_tests::{Scratch, Server};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

async fn status(channel: Channel, service: &str) -> Result<i32, tonic::Status> {
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(answer.into_inner().status)
}

#[tokio::test]
async fn health_on_both_listeners_and_reflection_lists_and_describes_the_fleet_api()
-> anyhow::Result<()> {
    let scratch = Scratch::new(&["val-a"])?;
    let config = scratch.server_config(&scratch.sqlite_url(), "")?;
    let server = Server::start(&config, scratch.path("server.log"))?;
    let (cert, key) = scratch.pki.operator();
    let mtls = scratch.channel(server.grpc, &cert, &key).await?;
    let serving = ServingStatus::Serving as i32;

    // mTLS listener: the whole server and each service by name; an unknown one is NotFound.
    for service in ["", "guardian.v1.Fleet", "guardian.v1.Uplink"] {
        assert_eq!(status(mtls.clone(), service).await?, serving, "{service:?}");
    }
    let unknown = status(mtls.clone(), "guardian.v1.Nope")
        .await
        .expect_err("an unknown service");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");

    // Admin listener: plain HTTP/2 (h2c), as a Kubernetes grpc probe calls it.
    let plain = Channel::from_shared(format!("http://{}", server.admin))?
        .connect()
        .await?;
    assert_eq!(status(plain.clone(), "").await?, serving);
    assert_eq!(status(plain, "guardian.v1.Fleet").await?, serving);
    // ... while the plain HTTP/1 endpoints stay as they were.
    let metrics = guardian_tests::admin_metrics(server.admin)?;
    assert!(metrics.contains("guardian_fleet_nodes"), "{metrics}");

    // Reflection: the services, then the Fleet API's file by one of its symbols.
    let mut reflection = ServerReflectionClient::new(mtls);
    let ask = |message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };
    let requests = tokio_stream::iter(vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "guardian.v1.Fleet".to_owned(),
        )),
        ask(MessageRequest::FileContainingSymbol(
            "guardian.v1.NoSuchThing".to_owned(),
        )),
    ]);
    let mut answers = reflection
        .server_reflection_info(requests)
        .await?
        .into_inner();
    let mut replies = Vec::new();
    // tonic's reflection ends the stream with NotFound for an unknown symbol.
    let ended = loop {
        match answers.message().await {
            Ok(Some(answer)) => replies.push(answer.message_response.expect("a response")),
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    assert_eq!(replies.len(), 2, "{replies:?}");
    let ended = ended.expect("the unknown symbol is refused");
    assert_eq!(ended.code(), tonic::Code::NotFound, "{ended:?}");
    let MessageResponse::ListServicesResponse(list) = &replies[0] else {
        panic!("not a service list: {:?}", replies[0]);
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "guardian.v1.Fleet",
        "guardian.v1.Uplink",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    let MessageResponse::FileDescriptorResponse(files) = &replies[1] else {
        panic!("no descriptor for guardian.v1.Fleet: {:?}", replies[1]);
    };
    let bytes = files.file_descriptor_proto.concat();
    for needle in ["guardian/v1/guardian.proto", "ListNodes", "IssueCommand"] {
        assert!(
            bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle} not in the descriptor"
        );
    }
    Ok(())
}
