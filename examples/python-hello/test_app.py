import unittest

from app import greeting


class GreetingTest(unittest.TestCase):
    def test_greets_the_path(self):
        self.assertEqual(greeting("/x"), "hello from python at /x\n")


if __name__ == "__main__":
    unittest.main()
