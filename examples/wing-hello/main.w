bring cloud;
bring http;
bring expect;

let api = new cloud.Api();
api.get("/hello", inflight () => {
  return { status: 200, body: "hello from understudy" };
});

test "hello answers" {
  let res = http.get("{api.url}/hello");
  expect.equal(res.status, 200);
}

test "two plus two" {
  expect.equal(2 + 2, 4);
}
