bring cloud;
bring expect;

let counter = new cloud.Counter(initial: 1);

test "counter starts at one" {
  expect.equal(counter.peek(), 1);
}

test "arithmetic is broken" {
  expect.equal(2 + 2, 5);
}
